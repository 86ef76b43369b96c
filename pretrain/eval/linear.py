"""Linear probing on frozen features: BatchNorm without affine parameters, then one linear layer, as
MAE evaluates (the BN makes features of any scale comparable). The learning rate is chosen on a
held-out part of the training split; the test split is touched once, by the final classifier."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LR_SWEEP = (0.1, 0.3, 1.0, 3.0, 10.0)  # multiples of eval.linear_lr tried on the held-out split


@dataclass
class LinearProbeResult:
    top1: float
    lr: float
    val_top1: dict[float, float]


def linear_head(dim: int, num_classes: int) -> nn.Sequential:
    head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), nn.Linear(dim, num_classes))
    nn.init.trunc_normal_(head[1].weight, std=0.01)
    nn.init.zeros_(head[1].bias)
    return head


def train_linear(
    features: Tensor, labels: Tensor, num_classes: int, lr: float, epochs: int, batch_size: int, seed: int
) -> nn.Module:
    """SGD with momentum and a cosine schedule over `epochs` passes of shuffled mini-batches."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    head = linear_head(features.shape[1], num_classes)
    optimizer = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps_per_epoch = -(-features.shape[0] // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    head.train()
    for _ in range(epochs):
        order = torch.randperm(features.shape[0], generator=gen)
        for start in range(0, features.shape[0], batch_size):
            index = order[start : start + batch_size]
            if index.numel() < 2:  # BatchNorm needs two samples
                continue
            loss = F.cross_entropy(head(features[index]), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head.eval()


@torch.no_grad()
def accuracy(head: nn.Module, features: Tensor, labels: Tensor) -> float:
    return (head(features).argmax(dim=1) == labels).float().mean().item()


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    base_lr: float,
    epochs: int,
    batch_size: int,
    val_fraction: float = 0.1,
    sweep: bool = True,
    seed: int = 0,
) -> LinearProbeResult:
    """Pick the lr on a held-out `val_fraction` of train, retrain on all of train, score on test."""
    train_x, test_x = train_x.float(), test_x.float()
    candidates = [base_lr * m for m in LR_SWEEP] if sweep else [base_lr]
    val_top1: dict[float, float] = {}
    if len(candidates) > 1:
        order = torch.randperm(train_x.shape[0], generator=torch.Generator().manual_seed(seed))
        num_val = max(1, int(val_fraction * train_x.shape[0]))
        val, fit = order[:num_val], order[num_val:]
        for lr in candidates:
            head = train_linear(train_x[fit], train_y[fit], num_classes, lr, epochs, batch_size, seed)
            val_top1[lr] = accuracy(head, train_x[val], train_y[val])
    best = max(candidates, key=lambda lr: val_top1.get(lr, 0.0))
    head = train_linear(train_x, train_y, num_classes, best, epochs, batch_size, seed)
    return LinearProbeResult(accuracy(head, test_x, test_y), best, val_top1)
