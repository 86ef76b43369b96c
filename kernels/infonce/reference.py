"""InfoNCE written directly from its formula: the definition every faster path is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def default_positives(num_queries: int, device: torch.device, offset: int = 0) -> Tensor:
    """Query i's positive is key `offset + i` (MoCo with keys gathered from all ranks: offset = rank * N)."""
    return torch.arange(num_queries, device=device) + offset


def info_nce_reference(
    q: Tensor,
    k: Tensor,
    temperature: float,
    positives: Tensor | None = None,
    normalize: bool = True,
    exclude: Tensor | None = None,
) -> Tensor:
    """mean_i [ -log( exp(q_i . k_{p_i} / T) / sum_{j != e_i} exp(q_i . k_j / T) ) ], q: [N, D], k: [M, D].

    `exclude[i]` (optional) is a key left out of query i's denominator: SimCLR's NT-Xent, where the keys
    are all 2N views and a view must not be its own negative (e_i = i's own index, p_i its partner's).
    Materializes the N x M logits: O(N * M) memory. Computed in at least float32.
    """
    _check_inputs(q, k, temperature, positives, exclude)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = q.to(math_dtype), k.to(math_dtype)
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / temperature
    if exclude is not None:
        excluded = torch.zeros_like(logits, dtype=torch.bool).scatter_(1, exclude[:, None], True)
        logits = logits.masked_fill(excluded, -torch.inf)
    targets = positives if positives is not None else default_positives(q.shape[0], q.device)
    return F.cross_entropy(logits, targets)


def nt_xent_indices(views_per_rank: int, rank: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(positives, exclude) of SimCLR's NT-Xent for one rank's rows [view 1 of its n images; view 2 of them]
    against the 2n rows of every rank gathered in rank order: row i of this rank is key rank * 2n + i, and
    its partner view is n rows away."""
    if views_per_rank % 2:
        raise ValueError(f"NT-Xent needs two views per image: an even number of rows, got {views_per_rank}")
    n = views_per_rank // 2
    own = torch.arange(views_per_rank, device=device) + rank * views_per_rank
    partner = torch.cat([own[n:], own[:n]])
    return partner, own


def _check_inputs(
    q: Tensor, k: Tensor, temperature: float, positives: Tensor | None, exclude: Tensor | None = None
) -> None:
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
    if exclude is not None:
        _check_indices("exclude", exclude, q, k)
    if positives is None:
        if q.shape[0] > k.shape[0]:
            raise ValueError(f"without explicit positives each query needs a key: N={q.shape[0]} > M={k.shape[0]}")
        if exclude is not None and exclude.device.type == "cpu" and bool((exclude == torch.arange(len(exclude))).any()):
            raise ValueError("info_nce: a query's excluded key is its positive")
        return
    _check_indices("positives", positives, q, k)
    if exclude is not None and exclude.device.type == "cpu" and bool((exclude == positives).any()):
        raise ValueError("info_nce: a query's excluded key is its positive")


def _check_indices(name: str, indices: Tensor, q: Tensor, k: Tensor) -> None:
    """One key index per query: `positives` or `exclude`."""
    if indices.shape != (q.shape[0],):
        raise ValueError(f"{name} must be [N]={q.shape[0]} indices, got shape {tuple(indices.shape)}")
    if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise ValueError(f"{name} must be integer key indices, got {indices.dtype}")
    if indices.device != q.device:
        raise ValueError(f"{name} are on {indices.device} but q is on {q.device}")
    # Range-checked only on the CPU: on a GPU the check would cost a host sync every step.
    if indices.device.type == "cpu" and (indices.min() < 0 or indices.max() >= k.shape[0]):
        raise ValueError(f"{name} must index keys in [0, {k.shape[0]}), got [{indices.min()}, {indices.max()}]")
