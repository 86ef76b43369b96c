"""Multi-head attention behind one entry point, with named backends.

Every backend computes the same thing, non-causal softmax attention without dropout on q, k, v of
shape [B, H, N, D]; "reference" is the readable definition the others are tested against.

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
from collections.abc import Callable
from typing import Literal, get_args

from torch import Tensor

from kernels.attention.reference import reference_attention, sdpa_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor], Tensor]


def _triton(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from kernels.attention.triton_attention import triton_attention

    return triton_attention(q, k, v)


def _xformers(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from kernels.attention.xformers_attention import xformers_attention

    return xformers_attention(q, k, v)


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


def attention(q: Tensor, k: Tensor, v: Tensor, backend: str = "sdpa") -> Tensor:
    """Non-causal attention over [B, H, N, D] inputs, returning [B, H, N, D] in the input dtype."""
    return get_attention_backend(backend)(q, k, v)


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "attention",
    "available_backends",
    "get_attention_backend",
    "reference_attention",
    "sdpa_attention",
    "unavailable_reason",
]
