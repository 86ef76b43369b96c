"""MoCo v3 and DINO end to end: EMA teachers, schedules, center, frozen layers, exact resume, no collapse,
and the same training on every engine."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.engines.single import SingleEngine
from pretrain.methods.dino import DINO
from pretrain.methods.moco import MoCoV3
from pretrain.models.vit import VisionTransformer
from pretrain.optim import WeightDecaySchedule, build_optimizer
from pretrain.recipes import load_config
from pretrain.train import Trainer

from test_engines import REPO, torchrun, train_args
from tiny import assert_equal_states, check_resume, tiny_overrides

MOCO = ["method.name=moco", "method.moco.mlp_dim=64", "method.moco.proj_dim=32"]
DINO_TINY = [
    "method.name=dino",
    "method.dino.out_dim=256",
    "method.dino.hidden_dim=64",
    "method.dino.bottleneck_dim=32",
    "data.local_crops=2",
    "data.local_crop_size=8",
]


def ssl_config(out: Path, shards: Path, method: list[str], *extra: str):
    return load_config(None, tiny_overrides(out, shards, "tracking.enabled=false", *method, *extra))


def _vit() -> VisionTransformer:
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_engine_ema_update_is_the_formula() -> None:
    cfg = load_config(None, ["run.device=cpu"])
    engine = SingleEngine(cfg, world=_one_process())
    online, averaged = nn.Linear(4, 3), nn.Linear(4, 3)
    before = copy.deepcopy(averaged.state_dict())
    engine.ema_update([(averaged, online)], 0.9)
    for name, value in averaged.state_dict().items():
        torch.testing.assert_close(value, 0.9 * before[name] + 0.1 * online.state_dict()[name])
    with pytest.raises(ValueError, match="parameter names differ"):
        engine.ema_update([(nn.Linear(4, 3), nn.Sequential(nn.Linear(4, 3)))], 0.9)


def _one_process():
    from pretrain.runtime.world import WorldInfo

    return WorldInfo()


def test_moco_starts_with_equal_twins_and_frozen_patch_projection() -> None:
    moco = MoCoV3(_vit(), proj_dim=16, mlp_dim=32)
    for target, source in moco.ema_pairs():
        for t, s in zip(target.parameters(), source.parameters()):
            assert torch.equal(t, s) and not t.requires_grad
    assert not any(p.requires_grad for p in moco.backbone.patch_embed.parameters())
    assert all(p.requires_grad for p in moco.backbone.blocks.parameters())
    assert moco.ema_momentum(0, 10) == pytest.approx(0.99) and moco.ema_momentum(10, 10) == pytest.approx(1.0)


def test_moco_training_moves_the_key_encoder_by_ema(tmp_path, digit_shards) -> None:
    """After every step: key encoder = m_k * previous + (1 - m_k) * query encoder, with the cosine m_k."""
    trainer = Trainer(ssl_config(tmp_path, digit_shards, MOCO, "train.steps=4"))
    method = trainer.method
    patch_before = copy.deepcopy(method.backbone.patch_embed.state_dict())
    snapshots = [copy.deepcopy((method.momentum_backbone.state_dict(), method.backbone.state_dict()))]
    hook = method.on_step_end
    method.on_step_end = lambda step, total: (  # type: ignore[method-assign]
        snapshots.append(copy.deepcopy((method.momentum_backbone.state_dict(), method.backbone.state_dict()))),
        hook(step, total),
    )
    trainer.fit()
    name = "blocks.0.attn.qkv.weight"
    for step in range(1, 5):
        m = method.ema_momentum(step, 4)
        expected = m * snapshots[step - 1][0][name] + (1 - m) * snapshots[step][1][name]
        torch.testing.assert_close(snapshots[step][0][name], expected, rtol=1e-6, atol=1e-7)
    assert 0.99 < method.ema_momentum(1, 4) < method.ema_momentum(3, 4) < 1.0
    assert not torch.equal(snapshots[4][0][name], snapshots[4][1][name])
    assert_equal_states(method.backbone.patch_embed.state_dict(), patch_before, "frozen patch projection")


def test_dino_center_is_an_ema_of_the_teacher_mean() -> None:
    dino = DINO(_vit(), out_dim=64, hidden_dim=32, bottleneck_dim=16, center_momentum=0.9)
    dino.center.fill_(0.5)
    teacher = torch.randn(2, 6, 64)
    dino.update_center(teacher)
    torch.testing.assert_close(dino.center, 0.9 * 0.5 + 0.1 * teacher.mean(dim=(0, 1)))


def test_dino_teacher_temperature_warms_up_linearly() -> None:
    dino = DINO(_vit(), out_dim=64, warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_steps=10)
    temps = []
    for _ in range(12):
        temps.append(float(dino.teacher_temperature()))
        dino.on_step_end(0, 0)
    assert temps[0] == pytest.approx(0.04) and temps[5] == pytest.approx(0.055)
    assert temps[10] == pytest.approx(0.07) and temps[11] == pytest.approx(0.07)


def test_dino_last_layer_is_frozen_for_the_first_steps_only() -> None:
    torch.manual_seed(0)
    dino = DINO(_vit(), out_dim=64, hidden_dim=32, bottleneck_dim=16, freeze_last_layer_steps=1)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    dino({"image": views})["loss"].backward()
    assert torch.equal(dino.head.last_layer.weight_v.grad, torch.zeros_like(dino.head.last_layer.weight_v))
    assert dino.head.mlp[0].weight.grad.abs().sum() > 0
    dino.zero_grad()
    dino.on_step_end(1, 10)
    dino({"image": views})["loss"].backward()
    assert dino.head.last_layer.weight_v.grad.abs().sum() > 0


def test_weight_decay_schedule_follows_a_cosine_on_the_decayed_group() -> None:
    cfg = load_config(None, ["optim.weight_decay=0.04", "optim.weight_decay_end=0.4"]).optim
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = build_optimizer(model, cfg, 1e-3, set())
    schedule = WeightDecaySchedule(optimizer, cfg, total_steps=100)
    assert schedule.apply(0) == pytest.approx(0.04)
    assert schedule.apply(50) == pytest.approx(0.22)
    assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(0.22)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0  # norms and biases never decay
    assert schedule.apply(100) == pytest.approx(0.4)


@pytest.mark.parametrize("method", [MOCO, DINO_TINY], ids=["moco", "dino"])
def test_interrupted_and_resumed_ssl_run_is_bit_identical(tmp_path, digit_shards, method) -> None:
    extra = (
        ["method.dino.warmup_teacher_temp_steps=4", "method.dino.freeze_last_layer_steps=2"]
        if "dino" in method[0]
        else []
    )
    config = lambda out, *more: ssl_config(out, digit_shards, method, *extra, *more)  # noqa: E731
    check_resume(config, tmp_path, "model (teachers, center and step counter included)")


def test_short_dino_run_does_not_collapse(tmp_path, digit_shards) -> None:
    """Teacher entropy stays away from 0 (one prototype wins) and from log K (uniform output)."""
    cfg = ssl_config(
        tmp_path,
        digit_shards,
        DINO_TINY,
        "train.steps=40",
        "train.log_every=2",
        "optim.warmup_steps=5",
        "method.dino.warmup_teacher_temp=0.02",
        "method.dino.warmup_teacher_temp_steps=10",
    )
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    entropies = [r["teacher_entropy"] for r in records if r["step"] > 10]
    log_k = math.log(256)
    assert len(entropies) == 15
    assert all(1.0 < h < 0.9 * log_k for h in entropies), entropies


def test_dino_attention_maps_are_a_picture() -> None:
    dino = DINO(_vit(), out_dim=64, hidden_dim=32, bottleneck_dim=16)
    pictures = dino.visuals({"image": [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]})
    grid = pictures["attention"]
    assert grid.dtype == torch.uint8 and grid.shape[-1] == 3
    assert grid.shape[0] == 2 + 3 * 18  # the images row and one row per head, 16 px cells with 2 px padding


def _records(run_dir: Path, key: str) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r]


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,engines",
    [
        (MOCO, ["ddp", "fsdp"]),
        (DINO_TINY, ["ddp", "fsdp", "deepspeed"]),
    ],
    ids=["moco", "dino"],
)
def test_two_rank_engines_train_the_same(tmp_path, digit_shards, method, engines) -> None:
    """Teachers are averaged on each rank's shard (FSDP) or partition (ZeRO-3): the runs must agree, and so
    must the kNN evaluation and the pictures taken mid-run from sharded encoders."""
    results, knn = {}, {}
    for engine in engines:
        settings = [f"engine.kind={engine}", "train.steps=4", "train.ckpt_every=0"]
        settings += ["engine.deepspeed.zero_stage=3"] if engine == "deepspeed" else []  # others reject it
        settings += ["train.knn_every=4", "train.vis_every=4"]
        overrides = tiny_overrides(tmp_path / engine, digit_shards, "tracking.enabled=false", *method, *settings)
        torchrun(2, train_args(overrides))
        results[engine] = _records(tmp_path / engine / "tiny", "loss")
        knn[engine] = _records(tmp_path / engine / "tiny", "knn_top1")
    reference = results.pop("ddp")
    assert len(reference) == 4 and len(knn["ddp"]) == 1
    for engine, losses in results.items():
        assert losses == pytest.approx(reference, rel=1e-4, abs=1e-5), engine
        # kNN top-1 is a count over the 360 test digits: DDP and FSDP reduce in different orders, so weights
        # equal to ~1e-6 can still flip one neighbour vote. Allow one image, no more.
        assert knn[engine] == pytest.approx(knn["ddp"], abs=1.0 / 360 + 1e-6), engine


def test_key_gathering_across_two_ranks_matches_one_process(tmp_path) -> None:
    """2 ranks x 4 queries against the 8 gathered keys == 1 process over the global batch of 8."""
    out = tmp_path / "gather.pt"
    torchrun(2, [str(REPO / "tests/dist_moco_gather.py"), str(out)])
    ranks = torch.load(out)
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    q.requires_grad_(True)
    from pretrain.methods.moco import moco_contrastive_loss

    loss = moco_contrastive_loss(q, k, 0.2)
    loss.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), loss.detach())
    # Each rank's gradient is for its own loss (mean over its 4 rows); the global mean halves it.
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]) / 2, q.grad)
    assert F.normalize(q, dim=1).shape == (8, 16)


def test_moco_trains_the_same_with_the_formula_and_the_tiled_infonce(tmp_path, digit_shards) -> None:
    """`auto` runs the O(N)-memory tiled kernel on CPU (Triton on GPU); the recipe must not notice."""
    runs = {}
    for impl in ("reference", "auto"):
        trainer = Trainer(ssl_config(tmp_path / impl, digit_shards, MOCO, f"method.moco.infonce_impl={impl}"))
        runs[impl] = (trainer.fit().losses, trainer.method.backbone.state_dict())
    assert runs["auto"][0] == pytest.approx(runs["reference"][0], rel=1e-5)
    # Adam turns float-rounding differences in near-zero gradients into differences of a fraction of one
    # step (lr 3e-5 here), so weights are compared at a few steps' size.
    for name, value in runs["reference"][1].items():
        torch.testing.assert_close(runs["auto"][1][name], value, rtol=1e-3, atol=1e-4)
