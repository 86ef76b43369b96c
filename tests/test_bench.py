"""`pretrain bench` runs every method's recipe through the real train loop (tiny sizes on CPU) and writes its result,
and real training logs TFLOP/s and MFU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pretrain.cli import main

from tiny import tiny_overrides


def one_recipe_per_method_and_backbone() -> list[Path]:
    """Recipes of the same method on the same backbone (and, for DiT, in the same space; for DINOv2, with or
    without a distilled teacher) differ in sizes and schedules only, which the tiny overrides replace;
    test_config.py loads and validates every one."""
    from pretrain.recipes import load_config

    chosen: dict[tuple, Path] = {}
    for path in sorted(Path("configs").glob("*.toml")):
        cfg = load_config(path)
        section = getattr(cfg.method, cfg.method.name)
        distilled = bool(getattr(section, "teacher_checkpoint", ""))  # a frozen teacher (kept at its random init)
        network = getattr(section, "arch", cfg.model.arch)  # a GAN's networks are method.gan.arch
        chosen.setdefault((cfg.method.name, network, getattr(section, "space", None), distilled), path)
    return sorted(chosen.values())


CONFIGS = one_recipe_per_method_and_backbone()
# Every method's size knobs at once: each recipe reads its own and ignores the rest.
TINY = [
    "model.size=tiny",
    "model.patch_size=8",
    "data.image_size=32",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.local_crop_size=16",
    "method.mae.decoder_dim=32",
    "method.mae.decoder_depth=1",
    "method.mae.decoder_heads=2",
    "method.moco.mlp_dim=64",
    "method.moco.proj_dim=32",
    "method.dino.out_dim=64",
    "method.dino.hidden_dim=64",
    "method.dino.bottleneck_dim=32",
    "method.dit.hidden_dim=64",
    "method.dit.depth=2",
    "method.dit.num_heads=2",
    "method.dit.input_size=8",
    "method.vae.base_channels=32",
    "method.vae.norm_groups=8",
    "method.vae.disc_channels=16",
    "method.jigsaw.tile_size=8",
    "method.jigsaw.gap=2",
    "method.jigsaw.jitter=1",
    "method.relative_patch.tile_size=8",
    "method.relative_patch.gap=2",
    "method.relative_patch.jitter=1",
    "method.inpainting.mask_size=16",
    "method.inpainting.disc_channels=16",
    "method.moco_v1.bn_group_size=2",
    "method.moco_v1.queue_size=64",
    "method.moco_v2.bn_group_size=2",
    "method.moco_v2.queue_size=64",
    # CPC: a 3x3 grid of 8 px patches over the 32 px image, which a ResNet reads only with the small stem
    "model.resnet_stem=small",
    "method.cpc.grid=3",
    "method.cpc.patch_size=8",
    "method.cpc.patch_stride=8",
    "method.cpc.first_offset=1",
    "method.cpc.last_offset=2",
    "method.cpc.context_dim=16",
    "method.gan.base_channels=8",
    "method.gan.max_channels=16",
    "method.gan.latent_dim=16",
    "method.gan.w_dim=16",
    "method.gan.mapping_layers=2",
    "method.gan.mbstd_group=2",
]


def bench(tmp_path: Path, config: Path, *extra: str) -> dict:
    args = ["bench", str(config), "--steps", "2", "--warmup", "1", "--out", str(tmp_path), *extra]
    args += [f"--set={item}" for item in TINY]
    assert main(args) == 0
    (result,) = tmp_path.glob(f"bench_{config.stem}_cpu*.json")
    return json.loads(result.read_text())


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_bench_every_recipe_synthetic(tmp_path, config):
    record = bench(tmp_path, config, "--synthetic-data")
    assert record["data"] == "synthetic" and record["timed_steps"] == 2 and len(record["step_times_s"]) == 2
    assert record["samples_per_sec"] > 0 and record["step_time_s"]["median"] > 0 and record["peak_memory_gb"] > 0
    assert record["device"]["type"] == "cpu" and record["versions"]["torch"]
    assert record["command"].startswith(f"pretrain bench {config}")
    assert record["config"]["train"]["ckpt_every"] == 0 and record["config"]["tracking"]["enabled"] is False
    assert record["mfu"] is None  # no bf16 peak on a CPU
    if record["method"] in ("vae", "vq", "gan"):  # conv autoencoders and GANs: no FLOP count
        assert record["flops_per_sample"] is None and record["tflops_per_device"] is None
    else:
        assert record["tflops_per_device"] > 0
    assert not list(tmp_path.glob("**/checkpoints"))


def test_bench_real_data_path_with_given_peak(tmp_path, digit_shards):
    record = bench(
        tmp_path,
        Path("configs/mae_vit_tiny_digits.toml"),
        "--peak-tflops=0.5",
        f"--set=data.shards={digit_shards}",
        "--set=data.image_size=16",
        "--set=model.patch_size=4",
    )
    assert record["data"] == "shards" and record["peak_tflops"] == 0.5
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)
    assert (tmp_path / "bench_mae_vit_tiny_digits_cpu.json").is_file()


def test_training_logs_tflops_and_mfu(tmp_path, digit_shards, caplog):
    from pretrain.recipes import load_config
    from pretrain.train import Trainer

    cfg = load_config(
        None, tiny_overrides(tmp_path, digit_shards, "train.steps=2", "train.peak_tflops=0.5", "tracking.enabled=false")
    )
    with caplog.at_level("INFO", logger="pretrain.train"):
        Trainer(cfg).fit()
    rows = [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(
        row["tflops_per_device"] > 0 and row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.5) for row in rows
    )
    assert "TFLOP/s | MFU" in caplog.text
