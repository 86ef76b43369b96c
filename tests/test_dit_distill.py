"""Diffusion distillation as a method (dit_distill): each mode's loss against its target computed directly from the
teacher, the teacher checks before any work, exact resume, and few-step sampling of a student checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_dit_training import dit_overrides

from pretrain.ckpt.load import load_method
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.diffusion.flow import interpolate, logit_normal_timesteps
from pretrain.diffusion.sampling import time_grid
from pretrain.recipes import load_config
from pretrain.sample import sample_grid
from pretrain.train import Trainer

from test_engines import torchrun, train_args
from tiny import assert_equal_states, check_resume


@pytest.fixture(scope="module")
def teacher(module_tmp, digit_shards) -> Path:
    """A tiny pixel DiT trained for 4 steps: the teacher run of every distillation here."""
    out = module_tmp("teacher")
    cfg = load_config(None, dit_overrides(out, digit_shards, "train.steps=4", "method.dit.t_shift=2.0"))
    return Trainer(cfg).fit().checkpoint


@pytest.fixture(scope="module")
def guidance_teacher(module_tmp, digit_shards, teacher) -> Path:
    """A guidance student of `teacher`, trained for 3 steps: the teacher of the stage-two distillations."""
    out = module_tmp("guidance")
    return Trainer(distill_config(out, digit_shards, teacher, "guidance", "train.steps=3")).fit().checkpoint


def distill_overrides(
    out: Path, shards: Path, teacher: Path, mode: str, *extra: str, stage_two: bool = False
) -> list[str]:
    """A distillation of `teacher` by the tiny DiT; `stage_two`: the student (and its teacher, a guidance
    student) takes the guidance scale as an input."""
    guidance_input = mode == "guidance" or stage_two
    return dit_overrides(
        out,
        shards,
        "method.name=dit_distill",
        "run.name=tiny_distill",
        f"method.dit_distill.mode={mode}",
        f'method.dit_distill.teacher_checkpoint="{teacher}"',
        "method.dit_distill.student_steps=2",
        "method.dit_distill.scales=4",
        "method.dit_distill.guidance_scales=[1.0, 3.0]",
        f"method.dit.guidance_embed={str(guidance_input).lower()}",
        "method.dit.class_dropout=0.25",
        "method.dit.t_shift=2.0",
        *extra,
    )


def distill_config(out: Path, shards: Path, teacher: Path, mode: str, *extra: str, stage_two: bool = False):
    return load_config(None, distill_overrides(out, shards, teacher, mode, *extra, stage_two=stage_two))


def perturbed(method) -> None:
    """Move every network off the zero init (and the student off the teacher) so the targets are not trivial."""
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in method.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def draws(seed: int, batch: int, labels: torch.Tensor, dropout: float, guidance: bool, scales=(1.0, 3.0)):
    """The method's own draws in its order from the seed: dropped labels, noise, guidance scales."""
    torch.manual_seed(seed)
    drop = torch.rand(labels.shape) < dropout
    dropped = torch.where(drop, torch.full_like(labels, 10), labels)
    noise = torch.randn(batch, 1, 16, 16)
    scale = scales[0] + (scales[1] - scales[0]) * torch.rand(batch) if guidance else None
    return dropped, noise, scale


def _batch():
    torch.manual_seed(11)
    return torch.randn(6, 1, 16, 16), torch.tensor([0, 1, 2, 3, 4, 9])


def test_progressive_loss_regresses_two_teacher_euler_steps(tmp_path, digit_shards, teacher) -> None:
    method = Trainer(distill_config(tmp_path, digit_shards, teacher, "progressive")).method
    perturbed(method)
    x, labels = _batch()
    torch.manual_seed(5)
    loss = method({"image": x, "label": labels})["loss"]

    dropped, noise, _ = draws(5, 6, labels, 0.25, False)
    k = torch.randint(0, 2, (6,))  # a step of the student's 2-step grid; the teacher's has 4
    grid = time_grid(4, 2.0)
    t, t_mid, t_next = grid[2 * k], grid[2 * k + 1], grid[2 * k + 2]
    x_t = interpolate(x, noise, t)
    with torch.no_grad():
        v = lambda z, s: method.teacher(z, s, dropped)  # noqa: E731
        x_mid = x_t + (t_mid - t).view(-1, 1, 1, 1) * v(x_t, t)
        x_next = x_mid + (t_next - t_mid).view(-1, 1, 1, 1) * v(x_mid, t_mid)
    target = (x_next - x_t) / (t_next - t).view(-1, 1, 1, 1)
    expected = (method.model(x_t, t, dropped) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert method.teacher.training is False and method.training


@pytest.mark.parametrize("target, huber_c", [("ema", 0.0), ("student", 0.01)])
def test_consistency_loss_against_the_target_one_teacher_step_closer(
    tmp_path, digit_shards, guidance_teacher, target, huber_c
) -> None:
    """f of the student at x_t against f of the target network (the EMA, or the student without grad) one teacher
    step closer to the data; the squared L2 distance, or the pseudo-Huber one of each sample's difference."""
    extra = [f"method.dit_distill.target={target}", f"method.dit_distill.huber_c={huber_c}"]
    cfg = distill_config(tmp_path, digit_shards, guidance_teacher, "consistency", *extra, stage_two=True)
    method = Trainer(cfg).method
    perturbed(method)
    x, labels = _batch()
    torch.manual_seed(5)
    loss = method({"image": x, "label": labels})["loss"]

    dropped, noise, scale = draws(5, 6, labels, 0.25, True)
    k = torch.randint(0, 4, (6,))
    grid = time_grid(4, 2.0)
    t, t_prev = grid[k], grid[k + 1]
    x_t = interpolate(x, noise, t)
    col = lambda s: s.view(-1, 1, 1, 1)  # noqa: E731
    with torch.no_grad():
        x_prev = x_t + col(t_prev - t) * method.teacher(x_t, t, dropped, guidance=scale)
        target_net = method.ema if target == "ema" else method.model
        goal = x_prev - col(t_prev) * target_net(x_prev, t_prev, dropped, guidance=scale)
    student = x_t - col(t) * method.model(x_t, t, dropped, guidance=scale)
    if huber_c:
        expected = ((student - goal).pow(2).sum(dim=(1, 2, 3)) + huber_c**2).sqrt().sub(huber_c).mean()
    else:
        expected = (student - goal).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    assert not torch.equal(method.ema.final_layer.linear.weight, method.model.final_layer.linear.weight)
    assert method.teacher.guidance_embed and method.model.guidance_embed


def test_guidance_loss_regresses_the_teachers_guided_velocity(tmp_path, digit_shards, teacher) -> None:
    method = Trainer(distill_config(tmp_path, digit_shards, teacher, "guidance")).method
    x, labels = _batch()
    t0 = torch.rand(6)
    # Loaded from the teacher, the student is its conditional model at every scale (zero-init scale embedder).
    with torch.no_grad():
        for s in (1.0, 4.0):
            torch.testing.assert_close(method.model(x, t0, labels, guidance=s), method.teacher(x, t0, labels))
    perturbed(method)
    torch.manual_seed(5)
    loss = method({"image": x, "label": labels})["loss"]

    dropped, noise, scale = draws(5, 6, labels, 0.25, True)
    t = logit_normal_timesteps(6, shift=2.0)
    x_t = interpolate(x, noise, t)
    with torch.no_grad():  # two separate teacher forwards, not the method's doubled batch
        v_cond = method.teacher(x_t, t, dropped)
        v_uncond = method.teacher(x_t, t, torch.full_like(dropped, 10))
    target = v_uncond + scale.view(-1, 1, 1, 1) * (v_cond - v_uncond)
    expected = (method.model(x_t, t, dropped, guidance=scale) - target).pow(2).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("mode", ["progressive", "consistency"])
def test_a_one_step_student_samples_with_one_network_evaluation(tmp_path, digit_shards, guidance_teacher, mode):
    method = Trainer(distill_config(tmp_path, digit_shards, guidance_teacher, mode, stage_two=True)).method
    perturbed(method)
    calls = []
    method.ema.register_forward_hook(lambda module, args, kwargs_out: calls.append(args))
    labels = torch.tensor([1, 7])
    images = method.generate(labels, steps=1, cfg_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert len(calls) == 1
    noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        one = noise - method.ema(noise, torch.ones(2), labels, guidance=torch.full((2,), 2.0))
    assert torch.equal(images, one)
    # The pictures: the student's samples, and the teacher's row (in the steps the student stands for) over its own.
    calls.clear()
    teacher_calls = []
    method.teacher.register_forward_hook(lambda module, args, out: teacher_calls.append(args))
    pictures = method.visuals({})
    assert pictures["teacher_vs_student"].shape == (2 * 18 + 2, 10 * 18 + 2, 3)
    assert len(calls) == 2 * 2  # the student's grid and its row, 2 steps each
    assert len(teacher_calls) == 4  # 2 x a progressive student's 2 steps; a consistency student's 4 scales


def test_teacher_checks_run_before_any_work(tmp_path, digit_shards, teacher, guidance_teacher) -> None:
    # A guidance distillation's teacher is a plain DiT run, not another guidance student.
    with pytest.raises(ConfigError, match="teacher_checkpoint: .* is a guidance distillation run"):
        Trainer(distill_config(tmp_path / "a", digit_shards, guidance_teacher, "guidance"))
    # The student's network must be the teacher's: the message names the key and the value to set.
    with pytest.raises(ConfigError, match=r"method.dit.depth: .* trained with 2.*set method.dit.depth=2"):
        Trainer(distill_config(tmp_path / "b", digit_shards, teacher, "progressive", "method.dit.depth=3"))
    # A stage-two student keeps its teacher's guidance input.
    with pytest.raises(ConfigError, match="method.dit.guidance_embed: .* set method.dit.guidance_embed=true"):
        Trainer(distill_config(tmp_path / "c", digit_shards, guidance_teacher, "consistency"))
    # The next progressive round halves the previous one's steps.
    previous = Trainer(
        distill_config(tmp_path / "d", digit_shards, teacher, "progressive", "train.steps=2", "run.name=round1")
    ).fit()
    with pytest.raises(ConfigError, match="student_steps: .* samples in 2 steps; .* set 1"):
        Trainer(distill_config(tmp_path / "e", digit_shards, previous.checkpoint, "progressive"))
    Trainer(
        distill_config(
            tmp_path / "f", digit_shards, previous.checkpoint, "progressive", "method.dit_distill.student_steps=1"
        )
    )
    with pytest.raises(ConfigError, match="teacher_checkpoint: a distillation needs"):
        load_config(None, dit_overrides(tmp_path, digit_shards, "method.name=dit_distill"))
    with pytest.raises(ConfigError, match="method.dit.guidance_embed: a DiT learns its guidance input"):
        load_config(None, dit_overrides(tmp_path, digit_shards, "method.dit.guidance_embed=true"))


def test_consistency_distillation_resumes_bit_identically_without_the_teacher_files(
    tmp_path, digit_shards, guidance_teacher
) -> None:
    config = lambda out, *extra: distill_config(  # noqa: E731
        out, digit_shards, guidance_teacher, "consistency", "train.ckpt_every=3", *extra, stage_two=True
    )
    full, _, state = check_resume(config, tmp_path)
    # The frozen teacher is in the student's checkpoint, unchanged by training.
    _, teacher_method, _ = load_method(guidance_teacher)
    teacher_ema = {f"teacher.{k}": v for k, v in teacher_method.ema.state_dict().items()}
    assert_equal_states({k: state[k] for k in teacher_ema}, teacher_ema, "teacher")
    assert not torch.equal(state["model.final_layer.linear.weight"], teacher_ema["teacher.final_layer.linear.weight"])


def test_pretrain_sample_takes_a_students_few_steps(tmp_path, digit_shards, guidance_teacher, capsys) -> None:
    cfg = distill_config(tmp_path, digit_shards, guidance_teacher, "progressive", "train.steps=2", stage_two=True)
    result = Trainer(cfg).fit()
    out = tmp_path / "grid.png"
    argv = ["sample", "--checkpoint", str(result.checkpoint), "--class", "3", "--num", "4", "--out", str(out)]
    assert main([*argv, "--cfg-scale", "2"]) == 0
    assert "euler, 2 steps, guidance scale s=2" in capsys.readouterr().out
    assert Image.open(out).size == (2 * 16 + 3 * 2, 2 * 16 + 3 * 2)
    one, how = sample_grid(result.checkpoint, label=3, num=4, steps=1, cfg_scale=1.0)
    assert how == "euler, 1 steps, guidance scale s=1" and one.shape == (38, 38, 3)


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_two_ranks_match_one_process_with_the_teacher_sharded(tmp_path, digit_shards, guidance_teacher, engine):
    """Consistency distillation (teacher, EMA target and student all run every step): 2 ranks x 1 stream == 1
    process with 2 data workers and 2 micro-batches per step. Under FSDP (built on the meta device) and ZeRO-3 the
    teacher is loaded into the shards; the FSDP run stopped after step 2 and resumed from its sharded checkpoint
    repeats the straight one."""
    steps = ["train.steps=3", "optim.warmup_steps=1"]
    one = distill_config(
        tmp_path / "one",
        digit_shards,
        guidance_teacher,
        "consistency",
        "optim.accum_steps=2",
        "data.num_workers=2",
        *steps,
        stage_two=True,
    )
    losses = Trainer(one).fit().losses
    empty = tmp_path / "overrides_only.toml"
    empty.write_text("")

    def two_ranks(out: Path, *extra: str) -> list[dict]:
        overrides = distill_overrides(out, digit_shards, guidance_teacher, "consistency", *steps, stage_two=True)
        sharded = {"fsdp": ["engine.fsdp.meta_init=true"], "deepspeed": ["engine.deepspeed.zero_stage=3"]}
        overrides += [f"engine.kind={engine}", *sharded.get(engine, [])]
        torchrun(2, train_args(overrides, *extra, config=empty), DS_ACCELERATOR="cpu")
        return [json.loads(line) for line in (out / "tiny_distill" / "metrics.jsonl").read_text().splitlines()]

    straight = two_ranks(tmp_path / "two")
    assert [row["loss"] for row in straight] == pytest.approx(losses, rel=1e-5, abs=1e-7)
    if engine == "fsdp":
        two_ranks(tmp_path / "split", "--until", "2")
        resumed = two_ranks(tmp_path / "split")
        assert [row["step"] for row in resumed] == [1, 2, 3]
        assert [row["loss"] for row in resumed] == [row["loss"] for row in straight]
