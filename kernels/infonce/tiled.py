"""InfoNCE tile by tile in PyTorch with O((N + M) x D) memory: the CPU path and a second reference for Triton.

Forward streams logit tiles q_b k_c^T / T through an online log-sum-exp and keeps, per query, only
its LSE; backward recomputes each tile as softmax = exp(logits - LSE) and accumulates dq and dk. The
N x M logits never exist at once: the largest temporary is one block_q x block_k tile. This is the
same algorithm the Triton kernel runs, written with torch ops so it can be read and gradchecked.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.infonce.reference import _check_inputs, default_positives

NORM_EPS = 1e-12  # F.normalize's eps, so normalize=True matches the reference exactly
DEFAULT_BLOCK = 1024


def info_nce_tiled(
    q: Tensor,
    k: Tensor,
    temperature: float,
    positives: Tensor | None = None,
    normalize: bool = True,
    block_q: int = DEFAULT_BLOCK,
    block_k: int = DEFAULT_BLOCK,
    exclude: Tensor | None = None,
) -> Tensor:
    """Same value and gradients as `info_nce_reference`, without materializing the N x M logits."""
    _check_inputs(q, k, temperature, positives, exclude)
    if block_q < 1 or block_k < 1:
        raise ValueError(f"info_nce block sizes must be >= 1, got block_q={block_q}, block_k={block_k}")
    if positives is None:
        positives = default_positives(q.shape[0], q.device)
    return _TiledInfoNCE.apply(q, k, positives, exclude, float(temperature), normalize, block_q, block_k)


def _mask_excluded(tile: Tensor, exclude: Tensor | None, r: int, c: int, fill: float, span=None) -> Tensor:
    """`fill` where the tile's column is the row's excluded key (rows from r, columns from c). `span` is
    (min, max) of the row block's excluded keys: tiles whose columns miss it (all but the diagonal ones for
    SimCLR) are returned untouched, without building a mask."""
    if exclude is None or (span is not None and (span[1] < c or span[0] >= c + tile.shape[1])):
        return tile
    cols = torch.arange(c, c + tile.shape[1], device=tile.device)
    return tile.masked_fill(exclude[r : r + tile.shape[0], None] == cols[None, :], fill)


def unit_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """x / max(|x|, eps) per row (as F.normalize), and the row norms backward needs."""
    norm = x.norm(dim=1, keepdim=True)
    return x / norm.clamp_min(NORM_EPS), norm


def unit_rows_backward(grad_unit: Tensor, unit: Tensor, norm: Tensor) -> Tensor:
    """Gradient through x -> x / |x|: drop the radial component, divide by the norm."""
    radial = torch.where(norm > NORM_EPS, unit * (unit * grad_unit).sum(dim=1, keepdim=True), 0.0)
    return (grad_unit - radial) / norm.clamp_min(NORM_EPS)


def _exclude_span(exclude: Tensor | None, r: int, rows: int) -> tuple[int, int] | None:
    if exclude is None:
        return None
    block = exclude[r : r + rows]
    return int(block.min()), int(block.max())


def _prepare(x: Tensor, normalize: bool) -> tuple[Tensor, Tensor | None]:
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return unit_rows(x) if normalize else (x, None)


class _TiledInfoNCE(torch.autograd.Function):
    """Saves q, k (the inputs, alive anyway), positives, exclude and the per-row LSE; nothing of size N x M."""

    @staticmethod
    def forward(ctx, q, k, positives, exclude, temperature, normalize, block_q, block_k):  # noqa: ANN001, ANN205
        qh, _ = _prepare(q, normalize)
        kh, _ = _prepare(k, normalize)
        lse = torch.empty(qh.shape[0], dtype=qh.dtype, device=qh.device)
        for r in range(0, qh.shape[0], block_q):
            rows = qh[r : r + block_q]
            span = _exclude_span(exclude, r, rows.shape[0])
            running_max = torch.full((rows.shape[0],), -torch.inf, dtype=qh.dtype, device=qh.device)
            running_sum = torch.zeros_like(running_max)
            for c in range(0, kh.shape[0], block_k):
                tile = _mask_excluded(rows @ kh[c : c + block_k].T / temperature, exclude, r, c, -torch.inf, span)
                new_max = torch.maximum(running_max, tile.amax(dim=1))
                # A row whose keys so far are all excluded has max -inf: shift by 0 there, not by -inf.
                shift = torch.where(torch.isinf(new_max), 0.0, new_max)
                running_sum = running_sum * torch.exp(running_max - shift)
                running_sum += torch.exp(tile - shift[:, None]).sum(dim=1)
                running_max = new_max
            lse[r : r + block_q] = running_max + torch.log(running_sum)
        positive_logits = (qh * kh[positives]).sum(dim=1) / temperature
        ctx.save_for_backward(q, k, positives, lse, exclude)
        ctx.config = (temperature, normalize, block_q, block_k)
        return (lse - positive_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        q, k, positives, lse, exclude = ctx.saved_tensors
        temperature, normalize, block_q, block_k = ctx.config
        need_dq, need_dk = ctx.needs_input_grad[:2]
        qh, q_norm = _prepare(q, normalize)
        kh, k_norm = _prepare(k, normalize)
        # d loss / d logits = (softmax - onehot(positive)) / N; logits = qh kh^T / T.
        scale = grad_loss.to(qh.dtype) / (qh.shape[0] * temperature)
        dqh = torch.zeros_like(qh) if need_dq else None
        dkh = torch.zeros_like(kh) if need_dk else None
        for r in range(0, qh.shape[0], block_q):
            rows, rows_lse = qh[r : r + block_q], lse[r : r + block_q, None]
            span = _exclude_span(exclude, r, rows.shape[0])
            for c in range(0, kh.shape[0], block_k):
                cols = kh[c : c + block_k]
                probs = torch.exp(rows @ cols.T / temperature - rows_lse)
                probs = _mask_excluded(probs, exclude, r, c, 0.0, span)
                if need_dq:
                    dqh[r : r + block_q] += probs @ cols
                if need_dk:
                    dkh[c : c + block_k] += probs.T @ rows
        dq = dk = None
        if need_dq:
            dqh = (dqh - kh[positives]) * scale
            dq = (unit_rows_backward(dqh, qh, q_norm) if normalize else dqh).to(q.dtype)
        if need_dk:
            dkh = dkh.index_add_(0, positives, qh, alpha=-1) * scale
            dk = (unit_rows_backward(dkh, kh, k_norm) if normalize else dkh).to(k.dtype)
        return dq, dk, None, None, None, None, None, None
