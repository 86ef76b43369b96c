"""InfoNCE / contrastive cross-entropy behind one function; callers never pick the implementation.

Three implementations compute the same mean loss and gradients:
- "reference": the formula, materializing the N x M logits (kernels/infonce/reference.py);
- "tiled": PyTorch, tile by tile with an online log-sum-exp, O((N + M) x D) memory (tiled.py);
- "triton": the fused kernels, same algorithm and memory (triton_kernels.py), for CUDA tensors or,
  with TRITON_INTERPRET=1, CPU tensors through the Triton interpreter.
"auto" takes triton on CUDA tensors (fp32/fp16/bf16) when triton is installed, and tiled otherwise.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from kernels.infonce.reference import default_positives, info_nce_reference, nt_xent_indices
from kernels.infonce.tiled import info_nce_tiled
from kernels.triton_support import triton_available

# The one list of implementations; the config field method.moco.infonce_impl is typed by it.
InfoNCEImpl = Literal["auto", "reference", "tiled", "triton"]
INFO_NCE_IMPLS: tuple[str, ...] = get_args(InfoNCEImpl)


def info_nce(
    q: Tensor,
    k: Tensor,
    temperature: float,
    positives: Tensor | None = None,
    normalize: bool = True,
    impl: str = "auto",
    exclude: Tensor | None = None,
) -> Tensor:
    """Mean contrastive cross-entropy of queries q [N, D] against keys k [M, D] (see `info_nce_reference`).

    positives[i] is the index of query i's key (default: i); exclude[i] (optional) a key left out of query
    i's softmax (SimCLR's NT-Xent: the query's own view; `nt_xent_indices` gives both). The loss is float32
    (float64 for float64 inputs) whatever the input dtype; gradients flow to q and k in their dtypes.
    """
    if impl not in INFO_NCE_IMPLS:
        raise ValueError(f"unknown info_nce impl {impl!r}; available: {', '.join(INFO_NCE_IMPLS)}")
    if impl == "auto":
        on_gpu = q.device.type == "cuda" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
        impl = "triton" if on_gpu and triton_available() else "tiled"
    if impl == "reference":
        return info_nce_reference(q, k, temperature, positives, normalize, exclude=exclude)
    if impl == "tiled":
        return info_nce_tiled(q, k, temperature, positives, normalize, exclude=exclude)
    if not triton_available():
        raise RuntimeError("info_nce impl='triton' needs the triton package: pip install triton")
    from kernels.infonce.triton_infonce import info_nce_triton

    return info_nce_triton(q, k, temperature, positives, normalize, exclude=exclude)


__all__ = [
    "INFO_NCE_IMPLS",
    "InfoNCEImpl",
    "default_positives",
    "info_nce",
    "info_nce_reference",
    "info_nce_tiled",
    "nt_xent_indices",
]
