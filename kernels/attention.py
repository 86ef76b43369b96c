"""Multi-head attention behind one entry point, with named backends.

Every backend computes the same thing, non-causal softmax attention without dropout on
q, k, v of shape [B, H, N, D]; "reference" is the readable definition the others are tested
against. Fast backends are added by registering a function in `_BACKENDS`.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, with the math in at least float32 so low-precision inputs get an exact answer."""
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32 = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    scores = (q32 @ k32.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v32).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused kernels (flash / memory-efficient / math, chosen by PyTorch per device and dtype)."""
    return F.scaled_dot_product_attention(q, k, v)


_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
}

ATTENTION_BACKENDS: tuple[str, ...] = tuple(_BACKENDS)


def available_backends() -> tuple[str, ...]:
    """Names accepted by `attention` in this environment."""
    return tuple(_BACKENDS)


def get_attention_backend(name: str) -> AttentionFn:
    """The function behind a backend name; fails with the names that would have worked."""
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}") from None


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """Non-causal attention over [B, H, N, D] inputs, returning [B, H, N, D] in the input dtype."""
    return get_attention_backend(backend)(q, k, v)
