"""`pretrain eval knn` and `pretrain eval linear`: frozen features of a checkpoint's inference network,
scored by weighted kNN or a linear probe."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import read_meta
from pretrain.ckpt.load import load_method
from pretrain.config import Config
from pretrain.engines.base import resolve_device
from pretrain.eval.features import count_classes, split_features
from pretrain.eval.knn import knn_top1
from pretrain.eval.linear import linear_probe
from pretrain.runtime.world import WorldInfo

log = logging.getLogger("pretrain.eval")


@dataclass
class FrozenFeatures:
    cfg: Config
    checkpoint: Path
    weights: str  # "step N" or "random init"
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int


def frozen_features(
    checkpoint: str | Path,
    shards: str = "",
    random_init: bool = False,
    overrides: list[str] | None = None,
) -> FrozenFeatures:
    """Encoder features of both splits (center crops, no augmentation), for kNN and linear probes."""
    cfg, method, path = load_method(checkpoint, random_init, overrides)
    shards = shards or cfg.eval.shards or cfg.data.shards
    device = resolve_device(cfg.run.device, WorldInfo())
    encoder = method.inference_network().to(device)
    train_x, train_y, test_x, test_y = split_features(cfg, encoder, shards, device)
    weights = "random init" if random_init else f"step {read_meta(path)['step']}"
    num_classes = count_classes(shards, train_y, test_y)
    return FrozenFeatures(cfg, path, weights, train_x, train_y, test_x, test_y, num_classes)


def evaluate_knn(
    checkpoint: str | Path, shards: str = "", random_init: bool = False, overrides: list[str] | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    f = frozen_features(checkpoint, shards, random_init, overrides)
    cfg = f.cfg
    top1 = knn_top1(f.train_x, f.train_y, f.test_x, f.test_y, f.num_classes, cfg.eval.k, cfg.eval.temperature)
    report = {
        "checkpoint": str(f.checkpoint),
        "weights": f.weights,
        "knn_top1": top1,
        "k": cfg.eval.k,
        "temperature": cfg.eval.temperature,
        "pool": cfg.eval.pool,
        "num_train": len(f.train_y),
        "num_test": len(f.test_y),
        "seconds": time.perf_counter() - start,
    }
    report["summary"] = (
        f"kNN top-1 {100 * top1:.2f}% ({f.weights}, k={cfg.eval.k}, T={cfg.eval.temperature}, "
        f"{len(f.train_y)} train / {len(f.test_y)} test, {cfg.eval.pool} pool)"
    )
    return report


def evaluate_linear(
    checkpoint: str | Path, shards: str = "", random_init: bool = False, overrides: list[str] | None = None
) -> dict[str, Any]:
    start = time.perf_counter()
    f = frozen_features(checkpoint, shards, random_init, overrides)
    ev = f.cfg.eval
    result = linear_probe(
        f.train_x,
        f.train_y,
        f.test_x,
        f.test_y,
        f.num_classes,
        base_lr=ev.linear_lr,
        epochs=ev.linear_epochs,
        batch_size=ev.linear_batch_size,
        val_fraction=ev.linear_val_fraction,
        sweep=ev.linear_sweep,
        seed=f.cfg.run.seed,
    )
    report = {
        "checkpoint": str(f.checkpoint),
        "weights": f.weights,
        "linear_top1": result.top1,
        "lr": result.lr,
        "val_top1_by_lr": {str(lr): acc for lr, acc in result.val_top1.items()},
        "epochs": ev.linear_epochs,
        "pool": ev.pool,
        "num_train": len(f.train_y),
        "num_test": len(f.test_y),
        "seconds": time.perf_counter() - start,
    }
    report["summary"] = (
        f"linear probe top-1 {100 * result.top1:.2f}% ({f.weights}, lr {result.lr:g} chosen on a held-out "
        f"{ev.linear_val_fraction:.0%} of train, {ev.linear_epochs} epochs, {len(f.train_y)} train / "
        f"{len(f.test_y)} test, {ev.pool} pool)"
    )
    return report
