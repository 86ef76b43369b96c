"""`pretrain demo`: real digits -> shards -> MAE ViT-tiny pretraining -> kNN, pretrained vs random init."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from data_pipeline.manifest import MANIFEST_NAME
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import DIGITS_CLASSES, digits_samples
from pretrain.eval.run import evaluate_knn
from pretrain.recipes import load_config
from pretrain.train import train

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "mae_vit_tiny_digits.toml"
log = logging.getLogger("pretrain.demo")


def ensure_digit_shards(out: Path, image_size: int) -> Path:
    if not (out / MANIFEST_NAME).is_file():
        write_shards(
            digits_samples(image_size),
            out,
            shard_size=128,
            classes=DIGITS_CLASSES,
            source="sklearn.datasets.load_digits",
            image_size=image_size,
        )
    return out


def run_demo(out_dir: str, steps: int = 0, overrides: list[str] | None = None) -> int:
    start = time.perf_counter()
    out = Path(out_dir).resolve()
    base = load_config(DEMO_CONFIG, overrides)
    shards = ensure_digit_shards(out / "digits-shards", base.data.image_size)
    cfg = load_config(
        DEMO_CONFIG,
        [
            f'data.shards="{shards}"',
            f'run.output_dir="{out}"',
            *(overrides or []),
            *([f"train.steps={steps}", f"optim.warmup_steps={min(steps, base.optim.warmup_steps)}"] if steps else []),
        ],
    )
    result = train(cfg)
    pretrained = evaluate_knn(result.checkpoint)
    random_init = evaluate_knn(result.checkpoint, random_init=True)
    summary = {
        "steps": result.step,
        "final_loss": result.losses[-1] if result.losses else None,
        "knn_top1_pretrained": pretrained["knn_top1"],
        "knn_top1_random_init": random_init["knn_top1"],
        "checkpoint": str(result.checkpoint),
        "mlflow_run_id": result.mlflow_run_id,
        "mlflow_ui": f"mlflow ui --backend-store-uri sqlite:///{cfg.run_dir.resolve()}/mlflow.db",
        "seconds": round(time.perf_counter() - start, 1),
    }
    (cfg.run_dir / "demo_result.json").write_text(json.dumps(summary, indent=2))
    print()
    print(f"MAE ViT-tiny on digits, {result.step} steps in {summary['seconds']:.0f}s")
    print(f"  kNN top-1, MAE-pretrained encoder: {100 * pretrained['knn_top1']:.2f}%")
    print(f"  kNN top-1, random-init encoder:    {100 * random_init['knn_top1']:.2f}%")
    print(f"  checkpoint: {result.checkpoint}")
    print(f"  MLflow run {result.mlflow_run_id}: {summary['mlflow_ui']}")
    return 0
