"""`pretrain eval knn`: frozen-encoder features of a checkpoint, scored by weighted kNN."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.manifest import Manifest
from launch.env import WorldInfo
from pretrain.checkpoint import CheckpointManager, dcp_load, is_complete, read_meta
from pretrain.config import Config, apply_overrides, config_from_dict
from pretrain.data import build_eval_loader
from pretrain.engines.base import resolve_device
from pretrain.eval.knn import knn_top1
from pretrain.methods.base import Method
from pretrain.methods.registry import build_method
from pretrain.rng import seed_everything

log = logging.getLogger("pretrain.eval")


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest complete one of a run or checkpoints directory."""
    path = Path(path)
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = CheckpointManager(root).latest()
        if found is not None:
            return found
    raise FileNotFoundError(f"no complete checkpoint at or under {path}")


def load_method(
    checkpoint: str | Path, random_init: bool = False, overrides: list[str] | None = None
) -> tuple[Config, Method, Path]:
    """Rebuild the method a checkpoint was trained with; its trained weights unless `random_init`.

    A random encoder uses the run's seed, so it is exactly the network the run started from.
    """
    path = find_checkpoint(checkpoint)
    cfg = config_from_dict(apply_overrides(read_meta(path)["config"], overrides or []))
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    if not random_init:
        dcp_load({"model": method.state_dict()}, path)  # fills the live parameters in place
    return cfg, method.eval(), path


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module, loader, pool: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    features, labels = [], []
    for batch in loader:
        features.append(encoder.forward_features(batch["image"].to(device), pool=pool).float().cpu())
        labels.append(batch["label"])
    return torch.cat(features), torch.cat(labels)


def _num_classes(shards: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> int:
    try:
        return len(Manifest.load(shards).classes)
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return int(max(train_labels.max(), test_labels.max())) + 1


def evaluate_knn(
    checkpoint: str | Path,
    shards: str = "",
    random_init: bool = False,
    overrides: list[str] | None = None,
    train_split: str = "train",
    test_split: str = "test",
) -> dict[str, Any]:
    start = time.perf_counter()
    cfg, method, path = load_method(checkpoint, random_init, overrides)
    shards = shards or cfg.eval.shards or cfg.data.shards
    device = resolve_device(cfg.run.device, WorldInfo())
    encoder = method.encoder().to(device)
    train_x, train_y = extract_features(encoder, build_eval_loader(cfg, shards, train_split), cfg.eval.pool, device)
    test_x, test_y = extract_features(encoder, build_eval_loader(cfg, shards, test_split), cfg.eval.pool, device)
    num_classes = _num_classes(shards, train_y, test_y)
    top1 = knn_top1(train_x, train_y, test_x, test_y, num_classes, cfg.eval.k, cfg.eval.temperature)
    weights = "random init" if random_init else f"step {read_meta(path)['step']}"
    report = {
        "checkpoint": str(path),
        "weights": weights,
        "knn_top1": top1,
        "k": cfg.eval.k,
        "temperature": cfg.eval.temperature,
        "pool": cfg.eval.pool,
        "num_train": len(train_y),
        "num_test": len(test_y),
        "seconds": time.perf_counter() - start,
    }
    report["summary"] = (
        f"kNN top-1 {100 * top1:.2f}% ({weights}, k={cfg.eval.k}, T={cfg.eval.temperature}, "
        f"{len(train_y)} train / {len(test_y)} test, {cfg.eval.pool} pool)"
    )
    return report
