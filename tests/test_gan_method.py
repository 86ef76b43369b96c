"""The GAN on the loop as two players: each player's update touches only its own parameters with its own settings,
update ratios and lazy R1, per-player optimizer state resumes bit-identically, pictures, `pretrain sample`, config
errors, and two ranks (DDP, FSDP) equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pretrain.ckpt.load import load_method
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.diffusion.transforms import to_unit
from pretrain.methods.gan_losses import discriminator_loss, generator_nonsaturating_loss, lazy_r1_weight, r1_penalty
from pretrain.methods.registry import build_method
from pretrain.recipes import load_config
from pretrain.train import Trainer
from pretrain.visualize import image_grid

from test_engines import torchrun, train_args
from tiny import assert_equal_states, check_resume, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

STYLEGAN_TINY = [
    "method.name=gan",
    "method.gan.arch=stylegan",
    "method.gan.channels=1",
    "method.gan.latent_dim=16",
    "method.gan.w_dim=16",
    "method.gan.mapping_layers=2",
    "method.gan.base_channels=4",
    "method.gan.max_channels=16",
    "method.gan.num_classes=10",
    "method.gan.mbstd_group=4",
    "method.gan.r1_gamma=1.0",
    "method.gan.r1_interval=2",
    "method.gan.vis_samples=2",
    "method.gan.vis_interpolations=2",
    "method.gan.vis_interpolation_steps=3",
    "method.gan.discriminator.base_lr=2e-3",
    "method.gan.discriminator.betas=[0.0, 0.99]",
    "method.gan.generator.base_lr=1e-3",
    "method.gan.generator.betas=[0.5, 0.9]",
    "method.gan.generator.every=2",
    "optim.weight_decay=0.0",
    "optim.lr_scaling=none",
    "data.crop_scale=[1.0, 1.0]",
]
DCGAN_TINY = [
    "method.name=gan",
    "method.gan.arch=dcgan",
    "method.gan.channels=1",
    "method.gan.latent_dim=8",
    "method.gan.base_channels=4",
    "method.gan.num_classes=10",
    "method.gan.vis_interpolations=1",
    "optim.weight_decay=0.0",
    "optim.lr_scaling=none",
    "data.crop_scale=[1.0, 1.0]",
]


def gan_config(out, shards, *extra: str, arch=STYLEGAN_TINY):
    return load_config(None, tiny_overrides(out, shards, "tracking.enabled=false", *arch, *extra))


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters (buffers such as StyleGAN's w_avg move in any training forward)."""
    return {name: tensor.detach().clone() for name, tensor in module.named_parameters()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module, prefix: str) -> set[str]:
    now = dict(module.named_parameters())
    return {name for name in before if name.startswith(prefix) and not torch.equal(before[name], now[name])}


def test_each_update_touches_only_its_players_parameters(tmp_path, digit_shards):
    trainer = Trainer(gan_config(tmp_path, digit_shards, "train.steps=4"))
    method, batches = trainer.method, iter(trainer.loader)
    groups = {group["player"]: group for group in trainer.optimizer.param_groups if group["params"]}
    assert (groups["discriminator"]["lr"], groups["generator"]["lr"]) == (2e-3 * 1 / 2, 1e-3 * 1 / 2)  # warmup 2
    assert groups["discriminator"]["betas"] == (0.0, 0.99) and groups["generator"]["betas"] == (0.5, 0.9)
    for step in range(4):
        before = snapshot(method)
        stats = trainer.train_step(batches)
        assert stats.applied and trainer.step == step + 1
        g_due = step % 2 == 0  # generator.every = 2: steps 0 and 2
        assert changed(before, method, "discriminator.")  # every step
        assert bool(changed(before, method, "generator.")) == g_due
        assert ("loss_generator" in stats.extras) == g_due and "loss_discriminator" in stats.extras
        assert ("r1_discriminator" in stats.extras) == (step % 2 == 0)  # r1_interval = 2
        # The EMA generator moves toward the generator every step (they differ from the first update on).
        assert changed(before, method, "generator_ema.")
    state = trainer.optimizer.state
    d_params = [p for g in trainer.optimizer.param_groups if g["player"] == "discriminator" for p in g["params"]]
    g_params = [p for g in trainer.optimizer.param_groups if g["player"] == "generator" for p in g["params"]]
    assert {int(state[p]["step"]) for p in d_params} == {4} and {int(state[p]["step"]) for p in g_params} == {2}
    assert not any(p.requires_grad for p in method.generator_ema.parameters())  # in no player's groups
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(d_params) + len(g_params)


def test_the_ema_generator_starts_as_the_generator():
    for arch in (STYLEGAN_TINY, DCGAN_TINY):
        method = build_method(load_config(None, [*arch, "data.image_size=16", "data.batch_size=4"]))
        assert_equal_states(method.generator_ema.state_dict(), method.generator.state_dict(), "generator_ema")


def test_the_losses_are_the_formulas(tmp_path):
    cfg = load_config(None, [*STYLEGAN_TINY, "data.image_size=16", "data.batch_size=4"])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    batch = {"image": torch.rand(4, 1, 16, 16) * 2 - 1, "label": torch.tensor([0, 1, 2, 3])}
    method._step = 0  # an R1 step
    torch.manual_seed(1)
    out = method(batch, player="discriminator")
    torch.manual_seed(1)
    z = torch.randn(4, 16)
    with torch.no_grad():
        fake = method.generator(z, batch["label"], style_mixing_prob=0.9)
    real = batch["image"].clone().requires_grad_(True)
    real_logits = method.discriminator(real, batch["label"])
    expected = discriminator_loss(real_logits, method.discriminator(fake, batch["label"]))
    expected = expected + lazy_r1_weight(1.0, 2) * r1_penalty(real, real_logits)
    torch.testing.assert_close(out["loss"], expected)
    method._step = 1  # not an R1 step
    assert "r1" not in method(batch, player="discriminator")
    torch.manual_seed(2)
    out = method(batch, player="generator")
    torch.manual_seed(2)
    fake = method.generator(torch.randn(4, 16), batch["label"], style_mixing_prob=0.9)
    torch.testing.assert_close(out["loss"], generator_nonsaturating_loss(method.discriminator(fake, batch["label"])))
    with pytest.raises(ValueError, match="players are 'discriminator' and 'generator'"):
        method(batch, player="critic")


@pytest.mark.parametrize("arch", [STYLEGAN_TINY, DCGAN_TINY], ids=["stylegan", "dcgan"])
def test_resume_is_bit_identical_with_both_players_state(tmp_path, digit_shards, arch, capsys):
    config = lambda out, *extra: gan_config(out, digit_shards, *extra, arch=arch)  # noqa: E731
    full, straight, (_, optimizer) = check_resume(config, tmp_path, "checkpoint", optimizer=True)
    players = {group["player"] for group in optimizer["param_groups"]}
    assert players == {"discriminator", "generator"}

    pictures = straight.method.visuals({"image": torch.zeros(1, 1, 16, 16)})
    assert pictures["samples"].dtype == torch.uint8 and pictures["samples"].shape[-1] == 3
    assert "interpolations" in pictures

    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(full.checkpoint), "--class", "3", "--num", "4", "--out", str(out)]
    assert main(args) == 0
    assert "samples of class 3 (one generator pass" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == (2 + 2 * 18, 2 + 2 * 18)
    _, method, _ = load_method(full.checkpoint)
    expected = method.generate(torch.full((4,), 3), 4, torch.Generator().manual_seed(0))
    grid = torch.from_numpy(np.array(Image.open(out)))
    assert torch.equal(grid, image_grid(to_unit(expected), nrow=2))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.image_size=24"], r"data\.image_size: a GAN generates power-of-2 sides"),
        (["engine.kind=deepspeed"], r"engine\.kind: method 'gan' trains players with optimizers of their own"),
        (["data.batch_size=6"], r"method\.gan\.mbstd_group: data\.batch_size 6 is not a multiple"),
        (["method.gan.generator.betas=[0.5]"], r"method\.gan\.generator\.betas: two values"),
        (["method.gan.generator.every=0"], r"method\.gan\.generator\.every"),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [*STYLEGAN_TINY, "data.image_size=16", "data.batch_size=8", *overrides])


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_and_resume_bit_identically(tmp_path, digit_shards, engine):
    """2 ranks x 1 stream == 1 process with 2 data workers (2 streams) and 2 micro-batches per step; and the
    2-rank run stopped after step 2 and resumed (both players' sharded optimizer state from its checkpoint)
    repeats the straight 2-rank run exactly."""
    steps = ["train.steps=3", "optim.warmup_steps=1", "method.gan.generator.every=1"]
    one = Trainer(gan_config(tmp_path / "one", digit_shards, "optim.accum_steps=2", "data.num_workers=2", *steps))
    losses = one.fit().losses
    empty = tmp_path / "overrides_only.toml"
    empty.write_text("")

    def two_ranks(out: Path, *extra: str) -> list[dict]:
        overrides = tiny_overrides(out, digit_shards, "tracking.enabled=false", *STYLEGAN_TINY)
        torchrun(2, train_args([*overrides, f"engine.kind={engine}", *steps], *extra, config=empty))
        return [json.loads(line) for line in (out / "tiny" / "metrics.jsonl").read_text().splitlines()]

    straight = two_ranks(tmp_path / "two")
    assert [row["loss"] for row in straight] == pytest.approx(losses, rel=1e-5, abs=1e-6)
    assert all("loss_generator" in row and "loss_discriminator" in row for row in straight)
    two_ranks(tmp_path / "split", "--until", "2")
    resumed = two_ranks(tmp_path / "split")
    assert [row["step"] for row in resumed] == [1, 2, 3]
    for name in ("loss", "loss_generator", "loss_discriminator", "grad_norm_generator", "grad_norm_discriminator"):
        assert [row[name] for row in resumed] == [row[name] for row in straight], name
