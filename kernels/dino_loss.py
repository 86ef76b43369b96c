"""DINO's self-distillation loss: cross-entropy from centered, sharpened teacher distributions of the
global views to the student distributions of every other view (multi-crop)."""

from __future__ import annotations

import torch
from torch import Tensor


def multicrop_pairs(num_global: int, num_views: int) -> list[tuple[int, int]]:
    """(teacher view, student view) pairs the loss averages over: every global teacher view against every
    student view except the identical one. 2 global + 10 local views give 2 * 12 - 2 = 22 pairs."""
    if not 0 < num_global <= num_views:
        raise ValueError(f"need 0 < num_global <= num_views, got {num_global} and {num_views}")
    return [(t, s) for t in range(num_global) for s in range(num_views) if s != t]


def teacher_probabilities(teacher_logits: Tensor, center: Tensor, temperature: float) -> Tensor:
    """softmax((t - c) / tau_t): centering prevents one dimension from dominating, sharpening prevents uniformity."""
    return ((teacher_logits.float() - center) / temperature).softmax(dim=-1)


def dino_loss(
    student_logits: Tensor, teacher_logits: Tensor, center: Tensor, student_temp: float, teacher_temp: float
) -> Tensor:
    """student_logits [V, B, K] (global views first), teacher_logits [G, B, K], center [K] -> scalar.

    mean over `multicrop_pairs` of mean over the batch of -sum_k P_t[k] log P_s[k].
    """
    return dino_cross_entropy(student_logits, teacher_probabilities(teacher_logits, center, teacher_temp), student_temp)


def dino_cross_entropy(student_logits: Tensor, teacher_probs: Tensor, student_temp: float) -> Tensor:
    """student_logits [V, B, K] (global views first), teacher target distributions [G, B, K] (centered and
    sharpened, or Sinkhorn-Knopp's: DINOv2) -> the mean over `multicrop_pairs` of the batch-mean cross-entropy."""
    if student_logits.ndim != 3 or teacher_probs.ndim != 3 or student_logits.shape[1:] != teacher_probs.shape[1:]:
        raise ValueError(
            f"dino_loss expects student [V, B, K] and teacher [G, B, K], got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_probs.shape)}"
        )
    num_global, num_views = teacher_probs.shape[0], student_logits.shape[0]
    teacher = teacher_probs.float()
    student = (student_logits.float() / student_temp).log_softmax(dim=-1)  # [V, B, K]
    cross = -torch.einsum("gbk,vbk->gv", teacher, student) / student.shape[1]  # mean CE for every pair
    pairs = multicrop_pairs(num_global, num_views)
    mask = torch.zeros(num_global, num_views, dtype=torch.bool, device=cross.device)
    mask[tuple(zip(*pairs))] = True
    return cross[mask].sum() / len(pairs)
