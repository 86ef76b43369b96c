"""Batch-level Mixup / CutMix with label smoothing for supervised fine-tuning, as timm's
`Mixup(mode='batch', correct_lam=True)` in the MAE fine-tuning recipe (mixup 0.8, cutmix 1.0, prob 1.0,
switch 0.5, smoothing 0.1).

One draw per batch: with probability `prob` the batch is mixed with itself reversed (sample i with B - 1 - i),
by CutMix with probability `switch_prob` when both alphas are > 0, else by Mixup, with lam ~ Beta(alpha, alpha).
Mixup blends whole images, lam * x + (1 - lam) * x.flip(0); CutMix pastes a box of the reversed batch whose
sides are sqrt(1 - lam) of the image's, centered uniformly and clipped to the image, then sets lam to the
area actually kept. The target is lam * smooth(y) + (1 - lam) * smooth(y.flip(0)) with label smoothing.

Randomness: scalars come from torch's global CPU RNG (timm: numpy's global RNG). The train loop reseeds the
global RNG before each micro-batch, so a batch's mixing is a deterministic function of that seed; the scalars
are drawn on the CPU whatever the image's device, so the draw is the same on CPU and CUDA; the tensor work
runs on the image's device. Other deviations: the input batch is not modified (timm mixes in place); an odd
batch raises ValueError (timm asserts); the batch travels as a dict and the target is added as "target".
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def smoothed_one_hot(labels: Tensor, num_classes: int, smoothing: float = 0.0) -> Tensor:
    """[B, num_classes] float: off value smoothing / num_classes, on value 1 - smoothing + off (rows sum to 1)."""
    off = smoothing / num_classes
    target = torch.full((labels.numel(), num_classes), off, dtype=torch.float32, device=labels.device)
    return target.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(labels: Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> Tensor:
    """The soft target of a batch mixed with its reverse at weight `lam` on the original."""
    target = smoothed_one_hot(labels, num_classes, smoothing)
    return target * lam + target.flip(0) * (1.0 - lam)


def soft_target_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum_c target_c * log_softmax(logits)_c: cross-entropy against soft labels."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def rand_bbox(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """(y_low, y_high, x_low, x_high) of timm's CutMix box: sides int(side * sqrt(1 - lam)), center uniform over
    the image (global CPU RNG), then clipped to the image, so it can be smaller than asked."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy = int(torch.randint(0, height, ()))
    cx = int(torch.randint(0, width, ()))
    y_low, y_high = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    x_low, x_high = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return y_low, y_high, x_low, x_high


def cutmix_bbox_and_lam(height: int, width: int, lam: float) -> tuple[tuple[int, int, int, int], float]:
    """The CutMix box and lam corrected to the fraction of the image outside it (the clipped box's true area)."""
    y_low, y_high, x_low, x_high = rand_bbox(height, width, lam)
    corrected = 1.0 - (y_high - y_low) * (x_high - x_low) / float(height * width)
    return (y_low, y_high, x_low, x_high), corrected


def _beta(alpha: float) -> float:
    concentration = torch.tensor(alpha, dtype=torch.float64)
    return float(torch.distributions.Beta(concentration, concentration).sample())


class Mixup:
    """Mixup / CutMix over a batch dict {"image": [B, C, H, W], "label": [B], ...} -> adds "target" [B, classes].

    Set `enabled = False` to stop mixing (targets are then the smoothed one-hot), as timm's `mixup_enabled`.
    """

    def __init__(
        self,
        num_classes: int,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
    ) -> None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"Mixup num_classes must be an integer >= 1, got {num_classes!r}")
        if mixup_alpha < 0 or cutmix_alpha < 0 or (mixup_alpha == 0 and cutmix_alpha == 0):
            raise ValueError(
                f"Mixup alphas must be >= 0 with at least one > 0, got mixup {mixup_alpha}, cutmix {cutmix_alpha}"
            )
        if not 0 <= prob <= 1:
            raise ValueError(f"Mixup prob must be in [0, 1], got {prob}")
        if not 0 <= switch_prob <= 1:
            raise ValueError(f"Mixup switch_prob must be in [0, 1], got {switch_prob}")
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"Mixup label_smoothing must be in [0, 1), got {label_smoothing}")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing
        self.enabled = True

    def sample_params(self) -> tuple[float, bool]:
        """(lam, use_cutmix) for one batch from the global CPU RNG, in timm's order of draws; lam = 1 means
        no mixing."""
        if not self.enabled or float(torch.rand(())) >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = float(torch.rand(())) < self.switch_prob
            return _beta(self.cutmix_alpha if use_cutmix else self.mixup_alpha), use_cutmix
        if self.mixup_alpha > 0:
            return _beta(self.mixup_alpha), False
        return _beta(self.cutmix_alpha), True

    def __call__(self, batch: dict) -> dict:
        image, labels = batch["image"], batch["label"]
        if image.dim() != 4 or not image.is_floating_point():
            raise ValueError(f"Mixup takes a float image batch [B, C, H, W], got {image.dtype} {tuple(image.shape)}")
        if labels.dim() != 1 or labels.numel() != image.shape[0]:
            raise ValueError(f"Mixup labels must be [B] = [{image.shape[0]}], got {tuple(labels.shape)}")
        if image.shape[0] % 2 != 0:
            raise ValueError(f"Mixup needs an even batch size (timm asserts it), got {image.shape[0]}")
        lam, use_cutmix = self.sample_params()
        if lam < 1.0:
            if use_cutmix:
                (y_low, y_high, x_low, x_high), lam = cutmix_bbox_and_lam(image.shape[-2], image.shape[-1], lam)
                mixed = image.clone()
                mixed[:, :, y_low:y_high, x_low:x_high] = image[:, :, y_low:y_high, x_low:x_high].flip(0)
                image = mixed
            else:
                image = image * lam + image.flip(0) * (1.0 - lam)
        target = mixup_target(labels.to(image.device), self.num_classes, lam, self.label_smoothing)
        return {**batch, "image": image, "target": target}

    def __repr__(self) -> str:
        return (
            f"Mixup(classes={self.num_classes}, mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, "
            f"prob={self.prob}, switch_prob={self.switch_prob}, smoothing={self.label_smoothing})"
        )
