"""Features of a frozen network on both splits of a shard set (center crops, no augmentation): what kNN and
the linear probe score, after training (`pretrain eval`) and during it (train.knn_every)."""

from __future__ import annotations

import torch

from data_pipeline.manifest import Manifest
from pretrain.config import Config
from pretrain.data import build_eval_loader


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
