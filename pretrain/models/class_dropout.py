"""Classifier-free guidance's label dropout: the null class in place of the label, so one network also learns the
unconditional prediction that guidance needs."""

from __future__ import annotations

import torch
from torch import Tensor


def drop_labels(labels: Tensor, rate: float, null_class: int, generator: torch.Generator | None = None) -> Tensor:
    """Each label replaced by `null_class` with probability `rate`: one uniform per label from `generator` (the
    global RNG when None), none drawn at rate 0."""
    if rate <= 0:
        return labels
    drop = torch.rand(labels.shape, generator=generator, device=labels.device) < rate
    return labels.masked_fill(drop, null_class)
