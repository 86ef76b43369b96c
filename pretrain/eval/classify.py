"""Top-1 of a classifier on a split (center crops, as kNN and the linear probe read it): what a fine-tune is
scored by at its end."""

from __future__ import annotations

import torch

from pretrain.config import Config
from pretrain.data import build_eval_loader


@torch.no_grad()
def classification_top1(
    cfg: Config, network: torch.nn.Module, shards: str, device: torch.device, split: str = "test"
) -> tuple[float, int]:
    """(top-1, images) of `network`'s logits on the split."""
    correct = total = 0
    for batch in build_eval_loader(cfg, shards, split):
        predicted = network(batch["image"].to(device)).argmax(dim=-1).cpu()
        correct += int((predicted == batch["label"]).sum())
        total += len(batch["label"])
    if not total:
        raise ValueError(f"no {split} images in {shards}")
    return correct / total, total


def percent_tag(fraction: float) -> str:
    """A label fraction in run and metric names: 0.1 -> "10pct", 0.01 -> "1pct", 0.125 -> "12.5pct"."""
    return f"{100 * fraction:g}pct"
