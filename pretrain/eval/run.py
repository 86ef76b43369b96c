"""`pretrain eval knn`: frozen-encoder features of a checkpoint, scored by weighted kNN."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
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
from pretrain.eval.linear import linear_probe
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


def split_features(
    cfg: Config, encoder: torch.nn.Module, shards: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train features, train labels, test features, test labels) of `encoder` on the shards' two splits."""
    train_x, train_y = extract_features(encoder, build_eval_loader(cfg, shards, "train"), cfg.eval.pool, device)
    test_x, test_y = extract_features(encoder, build_eval_loader(cfg, shards, "test"), cfg.eval.pool, device)
    return train_x, train_y, test_x, test_y


def count_classes(shards: str, train_labels: torch.Tensor, test_labels: torch.Tensor) -> int:
    try:
        return len(Manifest.load(shards).classes)
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return int(max(train_labels.max(), test_labels.max())) + 1


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
    encoder = method.encoder().to(device)
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
