"""`pretrain bench CONFIG`: training throughput and MFU of a recipe, measured through the real train loop.

    pretrain bench configs/mae_vit_b16.toml [--steps 20] [--warmup 5] [--synthetic-data] [--set KEY=VALUE ...]
        [--peak-tflops T] [--out benchmarks/results]

The benchmark drives `Trainer.fit` itself -- model, method, engine, optimizer step, EMA and the data
path -- with tracking, checkpoints, pictures and kNN turned off and the run directory in a temporary
folder. `--synthetic-data` replaces the shard stream by one batch that the method's own train transform
built from random images (latents for DiT in latent space), kept on the device and reused every step:
the step without the input pipeline, to compare with the real data path.

Step times are the intervals between consecutive optimizer steps after `--warmup` steps. The loop makes
one host sync per step (its finiteness check), so on a GPU each interval is one step of device time.
MFU = analytic training FLOPs per sample (pretrain/flops.py) x samples/s per device / bf16 peak.
The learning-rate warmup is set to 0 (the schedule does not change the compute).
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import platform
import shlex
import statistics
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pretrain.config import Config
from pretrain.flops import PEAK_BF16_FLOPS
from pretrain.memory import peak_memory_gb
from pretrain.methods.registry import METHODS
from pretrain.recipes import load_config

log = logging.getLogger("pretrain.bench")


class SyntheticLoader:
    """Stands in for the shard loader: the same batch every step, already on the device."""

    skipped_total = 0
    skipped_shards_total = 0

    def __init__(self, batch: dict[str, Any]):
        self.batch = batch

    def to(self, device: torch.device) -> SyntheticLoader:
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else [t.to(device) for t in v]  # noqa: E731
        self.batch = {name: move(value) for name, value in self.batch.items()}
        return self

    def __iter__(self):
        return itertools.repeat(self.batch)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _synthetic_record(cfg: Config, gen: torch.Generator) -> Any:
    """What one training record decodes to: an RGB image, for latent DiT the stored posterior (mean, std), for the
    token transformer a grid of codes."""
    if cfg.method.name == "gpt":
        side = cfg.method.gpt.token_grid
        return torch.randint(0, cfg.method.gpt.vocab_size, (side, side), generator=gen, dtype=torch.int16)
    dit = cfg.method.dit
    if cfg.method.name in ("dit", "dit_distill") and dit.space == "latent":
        side = dit.input_size
        return torch.stack(
            [torch.randn(dit.in_channels, side, side, generator=gen), torch.ones(dit.in_channels, side, side)]
        )
    size = cfg.data.image_size
    pixels = torch.randint(0, 256, (size, size, 3), generator=gen, dtype=torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(pixels))


def synthetic_batch(cfg: Config) -> dict[str, Any]:
    """data.batch_size samples through the method's real train transform, collated as the reader does."""
    from pretrain.methods.registry import build_train_transform

    transform = build_train_transform(cfg)
    gen = torch.Generator().manual_seed(cfg.run.seed)
    samples = [transform(_synthetic_record(cfg, gen), gen) for _ in range(cfg.data.batch_size)]
    if isinstance(samples[0], torch.Tensor):
        images: Any = torch.stack(samples)
    else:  # multi-view: one [B, C, H, W] tensor per view
        images = [torch.stack(views) for views in zip(*samples)]
    return {"image": images, "label": torch.zeros(len(samples), dtype=torch.long)}


def _portable(config: dict[str, Any]) -> dict[str, Any]:
    """The resolved config as the record keeps it: the run directory was a temporary one, so it says so rather
    than naming a path of this machine."""
    config["run"]["output_dir"] = "<a temporary directory, removed after the run>"
    return config


def bench_overrides(total_steps: int, output_dir: str) -> list[str]:
    return [
        f"train.steps={total_steps}",
        f"train.log_every={total_steps}",  # one progress line (with MFU), at the end
        "train.ckpt_every=0",
        "train.vis_every=0",
        "train.knn_every=0",
        "train.resume=none",
        "optim.warmup_steps=0",
        "tracking.enabled=false",
        f"run.output_dir={json.dumps(output_dir)}",
    ]


def describe_device(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "cpu_model": _cpu_model(), "cores": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpus=torch.cuda.device_count(), gpu_memory_gb=props.total_memory / 2**30)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def device_slug(info: dict[str, Any]) -> str:
    """Short device name for result files: cpu, h100, h200, a100, or the GPU name made file-safe."""
    if info["type"] != "cuda":
        return "cpu"
    name = info["gpu"]
    known = next((key for key, _ in PEAK_BF16_FLOPS if key in name), None)
    slug = (known or name).lower()
    return "".join(c if c.isalnum() else "_" for c in slug).strip("_")


def _versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version(), "torch": torch.__version__}
    versions["cuda"] = torch.version.cuda
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


def step_time_stats(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    median = statistics.median(ordered)
    return {
        "median": median,
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "p10": pick(0.1),
        "p90": pick(0.9),
        "spread": (pick(0.9) - pick(0.1)) / median,  # (p90 - p10) / median
    }


def _adjustments(cfg: Config, synthetic: bool) -> list[str]:
    """Overrides that let a recipe run here without changing its per-device compute."""
    from pretrain.runtime.world import world_from_env

    extra = []
    make_synthetic = METHODS[cfg.method.name].synthetic_overrides
    if synthetic and make_synthetic is not None:
        extra += make_synthetic(cfg)  # what the method would read from a manifest; any value keeps the compute
    if cfg.engine.kind != "single" and not world_from_env().distributed:
        # DDP/FSDP/DeepSpeed need a process group: outside torchrun, measure the same step on the single engine.
        log.warning("engine.kind=%s needs torchrun; benchmarking engine.kind=single instead", cfg.engine.kind)
        extra += ["engine.kind=single", "engine.fsdp.meta_init=false", "engine.fsdp.cpu_offload=false"]
    return extra


def run_benchmark(
    config: str, overrides: list[str], steps: int, warmup: int, synthetic: bool, command: str = ""
) -> dict[str, Any]:
    """Run warmup + steps training steps of the recipe and return the result record (not yet written)."""
    from pretrain.logs import setup_logging
    from pretrain.train import Trainer

    if steps < 1 or warmup < 1:
        raise ValueError(f"--steps and --warmup must be >= 1 (got {steps} and {warmup})")
    with tempfile.TemporaryDirectory(prefix="pretrain-bench-") as tmp:
        settings = [*overrides, *bench_overrides(warmup + steps, tmp)]
        cfg = load_config(config, settings)
        adjusted = _adjustments(cfg, synthetic)
        if adjusted:
            cfg = load_config(config, settings + adjusted)
        loader = SyntheticLoader(synthetic_batch(cfg)) if synthetic else None
        # On synthetic data a distillation's frozen teacher keeps its random init: the compute is the same.
        trainer = Trainer(cfg, loader=loader, load_teacher=not synthetic)
        if loader is not None:
            loader.to(trainer.engine.device)
        try:
            result = trainer.fit(save_final=False)
        finally:
            setup_logging()  # drop the log file in the temporary run directory
    device = trainer.engine.device
    times = [b - a for a, b in zip(result.step_ends[warmup - 1 :], result.step_ends[warmup:])]
    stats = step_time_stats(times)
    world_size = trainer.world.world_size
    samples_per_sec = trainer.samples_per_step / stats["median"]
    record: dict[str, Any] = {
        "benchmark": "pretrain bench",
        "config_file": str(config),
        "data": "synthetic" if synthetic else "shards",
        "device": describe_device(device),
        "versions": _versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "overrides": overrides,
        "adjusted_overrides": adjusted,  # set by the benchmark so the recipe runs here (see _adjustments)
        "method": cfg.method.name,
        "engine": trainer.engine.name,
        "precision": trainer.engine.precision,
        "world_size": world_size,
        "samples_per_step": trainer.samples_per_step,
        "warmup_steps": warmup,
        "timed_steps": steps,
        "step_time_s": stats,
        "step_times_s": times,
        "samples_per_sec": samples_per_sec,
        "peak_memory_gb": peak_memory_gb(device),
        "memory_measure": "torch.cuda.max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "final_loss": result.losses[-1] if result.losses else None,
        "flops_per_sample": trainer.flops,
        "tflops_per_device": None,
        "peak_tflops": trainer.peak_flops / 1e12 if trainer.peak_flops else None,
        "mfu": None,
        "config": _portable(cfg.to_dict()),
    }
    if trainer.flops is not None:
        achieved = trainer.flops["train"] * samples_per_sec / world_size
        record["tflops_per_device"] = achieved / 1e12
        record["mfu"] = achieved / trainer.peak_flops if trainer.peak_flops else None
    return record


def summary_line(record: dict[str, Any]) -> str:
    device = record["device"].get("gpu") or record["device"]["cpu_model"]
    stats = record["step_time_s"]
    parts = [
        f"{Path(record['config_file']).stem} ({record['data']} data) on {device}:",
        f"{record['samples_per_sec']:.1f} samples/s,",
        f"step {1000 * stats['median']:.1f} ms median (spread {100 * stats['spread']:.0f}%),",
        f"peak memory {record['peak_memory_gb']:.2f} GiB",
    ]
    if record["tflops_per_device"] is not None:
        parts.append(f", {record['tflops_per_device']:.3g} TFLOP/s")
        parts.append(f", MFU {100 * record['mfu']:.1f}%" if record["mfu"] is not None else " (no bf16 peak: no MFU)")
    else:
        parts.append(f" (no FLOP count for method {record['method']})")
    return " ".join(parts[:4]) + "".join(parts[4:])


def result_path(out_dir: str | Path, record: dict[str, Any]) -> Path:
    stem = Path(record["config_file"]).stem
    suffix = "_synthetic" if record["data"] == "synthetic" else ""
    return Path(out_dir) / f"bench_{stem}_{device_slug(record['device'])}{suffix}.json"


def cmd_bench(args: argparse.Namespace) -> int:
    from pretrain.distributed import destroy_distributed, rank

    overrides = list(args.overrides) + ([f"train.peak_tflops={args.peak_tflops}"] if args.peak_tflops else [])
    command = ["pretrain", "bench", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup)]
    command += ["--synthetic-data"] if args.synthetic_data else []
    command += [f"--set={item}" for item in args.overrides]
    command += [f"--peak-tflops={args.peak_tflops}"] if args.peak_tflops else []
    try:
        record = run_benchmark(
            args.config, overrides, args.steps, args.warmup, args.synthetic_data, shlex.join(command)
        )
        is_main = rank() == 0
    finally:
        destroy_distributed()
    if is_main:
        path = result_path(args.out, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
        print(summary_line(record))
        print(f"result: {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` to the top-level `pretrain` subparsers."""
    bench = subparsers.add_parser("bench", help="training throughput, step time, peak memory and MFU of a recipe")
    bench.add_argument("config", help="TOML file, e.g. configs/mae_vit_b16.toml")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--steps", type=int, default=20, help="timed steps (default 20)")
    bench.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5, at least 1)")
    bench.add_argument(
        "--synthetic-data", action="store_true", help="one in-memory batch of the right shapes instead of data.shards"
    )
    bench.add_argument(
        "--peak-tflops", type=float, default=0.0, help="device bf16 peak for MFU (default: from the GPU's name)"
    )
    bench.add_argument("--out", default="benchmarks/results", help="directory for the result JSON")
    bench.set_defaults(func=cmd_bench)
