"""Multi-head attention behind one entry point, with named backends.

Every backend computes the same thing, softmax attention without dropout on q of shape [B, H, Nq, D]
and k, v of shape [B, H, Nk, D] (self-attention: Nq == Nk), returning [B, H, Nq, D]; "reference" is the
readable definition the others are tested against. Non-causal by default; with `causal=True` query i
attends only to keys j <= i. When Nq < Nk (KV-cache decoding) the queries are the LAST Nq positions, so
query i attends to keys j <= i + (Nk - Nq) (the mask is aligned to the bottom right); causal attention
with Nq > Nk is an error. The xformers backend takes causal only with Nq == Nk.

- sdpa (default): torch.nn.functional.scaled_dot_product_attention, everywhere.
- reference: the formula in float32 (reference.py).
- triton: our fused kernel (triton_kernels.py) on CUDA tensors; on CPU tensors the PyTorch path
  (SDPA), or the kernel through the Triton interpreter when TRITON_INTERPRET=1 (tests).
- xformers: xformers.ops.memory_efficient_attention on CUDA tensors, SDPA on CPU tensors. xformers
  is optional (`pip install xformers`, which needs a CUDA build of torch).
A backend whose package is missing is known but not available: selecting it fails before any work,
with `unavailable_reason` naming the package to install.
"""

from __future__ import annotations

import importlib.util
from typing import Literal, Protocol, get_args

from torch import Tensor

from kernels.attention.reference import reference_attention, sdpa_attention


class AttentionFn(Protocol):
    """What every backend is: (q, k, v, causal=False) -> attention output in q's dtype."""

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor: ...


def _triton(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    from kernels.attention.triton_attention import triton_attention

    return triton_attention(q, k, v, causal=causal)


def _xformers(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    from kernels.attention.xformers_attention import xformers_attention

    return xformers_attention(q, k, v, causal=causal)


_BACKENDS: dict[str, AttentionFn] = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
    "triton": _triton,
    "xformers": _xformers,
}
# Backend -> (package it imports, how to install it).
_REQUIRES: dict[str, tuple[str, str]] = {
    "triton": ("triton", "pip install triton"),
    "xformers": ("xformers", "pip install xformers (it requires a CUDA build of torch)"),
}

# The one list of backend names; the config field model.attn_backend is typed by it.
AttentionBackend = Literal["sdpa", "reference", "triton", "xformers"]
ATTENTION_BACKENDS: tuple[str, ...] = get_args(AttentionBackend)
assert set(ATTENTION_BACKENDS) == set(_BACKENDS)


def unavailable_reason(name: str) -> str | None:
    """Why a known backend cannot run in this environment, or None (available, or not a backend name)."""
    if name not in _REQUIRES:
        return None
    package, install = _REQUIRES[name]
    if importlib.util.find_spec(package) is None:
        return f"attention backend {name!r} needs the {package} package, which is not installed: {install}"
    return None


def available_backends() -> tuple[str, ...]:
    """Names accepted by `attention` in this environment."""
    return tuple(name for name in ATTENTION_BACKENDS if unavailable_reason(name) is None)


def get_attention_backend(name: str) -> AttentionFn:
    """The function behind a backend name; fails with the names that would have worked, or the missing package."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(available_backends())}")
    reason = unavailable_reason(name)
    if reason:
        raise ValueError(reason)
    return _BACKENDS[name]


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa", causal: bool = False) -> Tensor:
    """Attention of q [B, H, Nq, D] over k, v [B, H, Nk, D], returning [B, H, Nq, D] in the input dtype.

    causal=False (default): every query sees every key. causal=True: query i sees keys j <= i + (Nk - Nq),
    i.e. j <= i for self-attention, and the queries are the last Nq positions when Nq < Nk (KV cache).
    """
    return get_attention_backend(backend)(q, k, v, causal=causal)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionFn",
    "attention",
    "available_backends",
    "get_attention_backend",
    "reference_attention",
    "sdpa_attention",
    "unavailable_reason",
]
