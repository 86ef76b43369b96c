"""The readable definition of attention, and PyTorch's fused SDPA: the two backends that run everywhere.

Causal masking is aligned to the bottom right: with Nq queries and Nk >= Nq keys, the queries are the
LAST Nq positions of the sequence (KV-cache decoding), so query i attends to keys j <= i + (Nk - Nq).
With Nq == Nk that is the usual j <= i.
"""

import torch
import torch.nn.functional as F
from torch import Tensor


def causal_offset(q: Tensor, k: Tensor) -> int:
    """Nk - Nq, the position of query 0 in the key sequence; fails when there are more queries than keys,
    where the first queries would have no key to attend to."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    if n_q > n_k:
        raise ValueError(
            f"causal attention needs at most as many queries as keys (the queries are the last Nq positions), "
            f"got Nq={n_q} > Nk={n_k}"
        )
    return n_k - n_q


def causal_mask(n_q: int, n_k: int, device: torch.device | str | None = None) -> Tensor:
    """[Nq, Nk] booleans, True where query i may attend to key j, that is j <= i + (Nk - Nq)."""
    return torch.ones(n_q, n_k, dtype=torch.bool, device=device).tril(diagonal=n_k - n_q)


def reference_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """softmax(q k^T / sqrt(D) + mask) v, with the math in at least float32 so low-precision inputs get an exact
    answer; the mask is -inf where key j lies after query i (causal, bottom-right aligned), else 0."""
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32 = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    scores = (q32 @ k32.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        causal_offset(q, k)
        scores = scores.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], device=q.device), float("-inf"))
    return (scores.softmax(dim=-1) @ v32).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """PyTorch's fused kernels (flash / memory-efficient / math, chosen by PyTorch per device and dtype).

    SDPA's own is_causal aligns the mask to the top left when Nq != Nk, so only the square case uses it;
    otherwise the bottom-right mask is passed explicitly.
    """
    if not causal:
        return F.scaled_dot_product_attention(q, k, v)
    if causal_offset(q, k) == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(q.shape[-2], k.shape[-2], device=q.device))
