"""MAE, MoCo v3, DINO and the pretext tasks on real handwritten digits: each pretrains a ViT-tiny/4 on the CPU,
then its frozen encoder is scored by weighted kNN and a linear probe against a random-init encoder of the same
shape.

    python benchmarks/ssl_digits.py                     # MAE, MoCo v3 and DINO
    python benchmarks/ssl_digits.py --methods jigsaw    # one pretext task (rotation, jigsaw, relative_patch, ...;
                                                        # colorization runs but is not benchmarked: the digits are gray)
    python benchmarks/ssl_digits.py --methods dino --steps 50
    python benchmarks/ssl_digits.py --methods cpc       # CPC v2 on a ResNet-18 (layer norm) over a patch grid

Each method runs its digits demo config (configs/*_digits.toml) unchanged apart from paths; the table and
a JSON record (device, versions, seconds per method) go to benchmarks/results/ssl_digits_cpu.json. Rows of
methods not run keep their earlier results, each with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pretrain.demo import ensure_digit_shards
from pretrain.eval.run import evaluate_knn, evaluate_linear
from pretrain.logs import setup_logging
from pretrain.recipes import load_config
from pretrain.train import train

from machine import device_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "mae": ROOT / "configs" / "mae_vit_tiny_digits.toml",
    "moco": ROOT / "configs" / "moco_v3_vit_tiny_digits.toml",
    "dino": ROOT / "configs" / "dino_vit_tiny_digits.toml",
    "simclr": ROOT / "configs" / "simclr_vit_tiny_digits.toml",
    "moco_v2": ROOT / "configs" / "moco_v2_vit_tiny_digits.toml",
    "cpc": ROOT / "configs" / "cpc_v2_resnet18_digits.toml",
    "rotation": ROOT / "configs" / "rotation_vit_tiny_digits.toml",
    "jigsaw": ROOT / "configs" / "jigsaw_vit_tiny_digits.toml",
    "relative_patch": ROOT / "configs" / "relative_patch_vit_tiny_digits.toml",
    "inpainting": ROOT / "configs" / "inpainting_vit_tiny_digits.toml",
    # Runnable, not run: the digits are gray (one ab bin), so colorization has nothing to learn on them.
    "colorization": ROOT / "configs" / "colorization_vit_tiny_digits.toml",
}


def run_method(name: str, out: Path, shards: Path, steps: int) -> dict:
    overrides = [f'data.shards="{shards}"', f'run.output_dir="{out}"', "train.resume=none"]
    if steps:
        base = load_config(CONFIGS[name])
        overrides += [f"train.steps={steps}", f"optim.warmup_steps={min(steps, base.optim.warmup_steps)}"]
    cfg = load_config(CONFIGS[name], overrides)
    started = time.perf_counter()
    result = train(cfg)
    train_seconds = time.perf_counter() - started
    scores = {}
    for weights, random_init in (("pretrained", False), ("random_init", True)):
        scores[weights] = {
            "knn_top1": evaluate_knn(result.checkpoint, random_init=random_init)["knn_top1"],
            "linear_top1": evaluate_linear(result.checkpoint, random_init=random_init)["linear_top1"],
        }
    return {
        "config": str(CONFIGS[name].relative_to(ROOT)),
        "steps": result.step,
        "global_batch": cfg.data.batch_size * cfg.optim.accum_steps,
        "train_seconds": round(train_seconds, 1),
        "final_loss": result.losses[-1] if result.losses else None,
        "mlflow_run_id": result.mlflow_run_id,
        **scores,
    }


def table(results: dict[str, dict]) -> str:
    lines = [
        "| method | steps | train time | kNN top-1 (pretrained / random init) | linear probe top-1 (pretrained / random init) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        p, z = r["pretrained"], r["random_init"]
        lines.append(
            f"| {name} | {r['steps']} | {r['train_seconds']:.0f} s | {100 * p['knn_top1']:.2f}% / "
            f"{100 * z['knn_top1']:.2f}% | {100 * p['linear_top1']:.2f}% / {100 * z['linear_top1']:.2f}% |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="mae,moco,dino", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=0, help="override every method's train.steps (0: the config's)")
    parser.add_argument("--workdir", default="runs/ssl_digits", help="shards, runs and MLflow stores")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    args = parser.parse_args()
    setup_logging()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(CONFIGS)}")

    workdir = Path(args.workdir).resolve()
    image_size = load_config(CONFIGS["mae"]).data.image_size
    shards = ensure_digit_shards(workdir / "digits-shards", image_size)
    script = Path(sys.argv[0]).resolve()  # recorded relative to the repository root, without this machine's python
    command = " ".join(
        ["python", str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script), *sys.argv[1:]]
    )
    date = datetime.now(UTC).isoformat(timespec="seconds")
    results = {name: {**run_method(name, workdir, shards, args.steps), "command": command} for name in methods}

    device = device_info()
    out = Path(args.out) / f"ssl_digits_{device['type']}.json"
    if out.is_file():  # rows of methods not run this time are kept, each with the command that made it
        results = {**json.loads(out.read_text()).get("results", {}), **results}
    record = {
        "benchmark": "ssl_digits",
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": date,
        "command": command,
        "data": "scikit-learn load_digits: 1,437 train / 360 test images, upsampled to 32 px",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
