"""AdamW with the usual ViT parameter groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from pretrain.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: MAE/MoCo/DINO scale a base rate linearly with the batch (reference 256)."""
    return cfg.base_lr * global_batch / 256 if cfg.lr_scaling == "linear" else cfg.base_lr


def param_groups(model: nn.Module, weight_decay: float, skip: set[str]) -> list[dict]:
    """Biases, norm weights and the names in `skip` (tokens, embeddings) get no weight decay."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, lr: float, skip: set[str]) -> torch.optim.Optimizer:
    # The fused kernel only exists for accelerator tensors; foreach is the fast path on CPU.
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, skip),
        lr=lr,
        betas=cfg.betas,
        eps=cfg.eps,
        fused=True if on_cuda else None,
    )


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then half a cosine down to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, peak_lr: float, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate as a function of the step and the settings alone, standing at `start_step`.

    A resumed run builds it anew from the settings it resumes with (so a changed rate, warmup or length
    takes effect at the resumed step); with unchanged settings it equals the saved schedule exactly."""
    floor = cfg.min_lr * peak_lr / cfg.base_lr if cfg.lr_scaling == "linear" else cfg.min_lr
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak_lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: warmup_cosine(step, total_steps, cfg.warmup_steps, peak_lr, floor) / peak_lr,
        last_epoch=start_step - 1,
    )


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Settings that a loaded optimizer state carries in its parameter groups are taken from the config,
    so a resume with changed settings uses them (the moments are kept)."""
    for index, group in enumerate(optimizer.param_groups):
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "eps" in group:
            group["eps"] = cfg.eps
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0  # the decayed group (see `param_groups`)


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """Half a cosine from `start` at step 0 to `end` at `total` (DINO's weight decay and EMA momentum)."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightDecaySchedule:
    """Sets the decay of every decayed parameter group for the coming step (DINO raises it 0.04 -> 0.4).

    A pure function of the step, so nothing needs checkpointing; a no-op when weight_decay_end < 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.optimizer, self.cfg, self.total = optimizer, cfg, total_steps
        self.enabled = cfg.weight_decay_end >= 0

    def apply(self, step: int) -> float:
        """Weight decay used by optimizer step `step` (0-based)."""
        if not self.enabled:
            return self.cfg.weight_decay
        value = cosine_ramp(step, self.total, self.cfg.weight_decay, self.cfg.weight_decay_end)
        self.optimizer.param_groups[0]["weight_decay"] = value  # the decayed group (see `param_groups`)
        return value
