"""InfoNCE written directly from its formula: the definition every faster path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def default_positives(num_queries: int, device: torch.device, offset: int = 0) -> Tensor:
    """Query i's positive is key `offset + i` (MoCo with keys gathered from all ranks: offset = rank * N)."""
    return torch.arange(num_queries, device=device) + offset


def info_nce_reference(
    q: Tensor, k: Tensor, temperature: float, positives: Tensor | None = None, normalize: bool = True
) -> Tensor:
    """mean_i [ -log( exp(q_i . k_{p_i} / T) / sum_j exp(q_i . k_j / T) ) ], q: [N, D], k: [M, D].

    Materializes the N x M logits: O(N * M) memory. Computed in at least float32.
    """
    _check_inputs(q, k, temperature, positives)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(math_dtype), k.to(math_dtype)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    targets = positives if positives is not None else default_positives(q.shape[0], q.device)
    return F.cross_entropy(logits, targets)


def _check_inputs(q: Tensor, k: Tensor, temperature: float, positives: Tensor | None) -> None:
    """Shared by every implementation, so bad input fails the same way whichever path runs."""
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"info_nce expects q [N, D] and k [M, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[0] == 0 or k.shape[0] == 0:
        raise ValueError(f"info_nce needs at least one query and one key, got N={q.shape[0]}, M={k.shape[0]}")
    if q.dtype != k.dtype or q.device != k.device:
        raise ValueError(f"info_nce q and k differ: {q.dtype} on {q.device} vs {k.dtype} on {k.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"info_nce expects floating-point q and k, got {q.dtype}")
    if temperature <= 0:
        raise ValueError(f"info_nce temperature must be > 0, got {temperature}")
    if positives is None:
        if q.shape[0] > k.shape[0]:
            raise ValueError(f"without explicit positives each query needs a key: N={q.shape[0]} > M={k.shape[0]}")
        return
    if positives.shape != (q.shape[0],):
        raise ValueError(f"positives must be [N]={q.shape[0]} indices, got shape {tuple(positives.shape)}")
    if positives.dtype.is_floating_point or positives.dtype.is_complex or positives.dtype == torch.bool:
        raise ValueError(f"positives must be integer key indices, got {positives.dtype}")
    if positives.device != q.device:
        raise ValueError(f"positives are on {positives.device} but q is on {q.device}")
    # Range-checked only on the CPU: on a GPU the check would cost a host sync every step.
    if positives.device.type == "cpu" and (positives.min() < 0 or positives.max() >= k.shape[0]):
        raise ValueError(f"positives must index keys in [0, {k.shape[0]}), got [{positives.min()}, {positives.max()}]")
