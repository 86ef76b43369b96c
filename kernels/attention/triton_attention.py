"""The triton attention backend: autograd wrapper and launcher for kernels/attention/triton_kernels.py.

On CUDA tensors the kernels run compiled (autotuned block sizes). On CPU tensors the backend
computes with PyTorch's SDPA, so a config naming `triton` still runs on a laptop, unless
TRITON_INTERPRET=1, where the kernels run through the Triton interpreter (how the tests check them).

q is [B, H, Nq, D] and k, v are [B, H, Nk, D]; causal=True masks key j for query i when
j > i + (Nk - Nq) (the queries are the last Nq positions, as with a KV cache) and needs Nq <= Nk.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.attention.reference import causal_offset, sdpa_attention
from kernels.triton_support import interpreting

# Under the interpreter each tile step costs milliseconds whatever its size, and autotuning is off.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """Softmax attention of q [B, H, Nq, D] over k, v [B, H, Nk, D], causal or not; the Triton kernel on CUDA,
    the PyTorch path on CPU."""
    if q.device.type != "cuda" and not interpreting():
        return sdpa_attention(q, k, v, causal=causal)
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(
            "triton attention expects k, v of one shape [B, H, N, D] and q of shape [B, H, Nq, D], "
            f"got {q.shape}, {k.shape}, {v.shape}"
        )
    if causal:
        causal_offset(q, k)  # raises when Nq > Nk
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(
            f"triton attention supports float32, float16 and bfloat16 alike, got {q.dtype}, {k.dtype}, {v.dtype}"
        )
    kernels = kernels_module()
    if q.device.type != "cuda" and not kernels.INTERPRETED:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after triton was imported; set it before anything imports triton"
        )
    return _TritonAttention.apply(q, k, v, causal)


def kernels_module():
    """The kernel module; imported on first use so that importing kernels never imports triton."""
    from kernels.attention import triton_kernels

    return triton_kernels


def _unit_last_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _options(kernels, x: Tensor) -> dict:
    options = {
        "BLOCK_D": max(16, 1 << (x.shape[-1] - 1).bit_length()),
        "DOT_F32": kernels.INTERPRETED and x.dtype == torch.bfloat16,
        "INPUT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
    }
    if kernels.INTERPRETED:
        options.update(INTERPRETER_BLOCKS)
    return options


def _strides(*tensors: Tensor) -> list[int]:
    return [s for t in tensors for s in t.stride()[:3]]


class _TritonAttention(torch.autograd.Function):
    """Saves q, k, v, the output and the per-row LSE (B x H x Nq floats), never the Nq x Nk probabilities."""

    @staticmethod
    def forward(ctx, q, k, v, causal):  # noqa: ANN001, ANN205
        kernels = kernels_module()
        q, k, v = _unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v)
        batch, heads, n_q, head_dim = q.shape
        n_kv = k.shape[2]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.empty(batch * heads, n_q, dtype=torch.float32, device=q.device)
        sm_scale = head_dim**-0.5
        grid = lambda meta: (-(-n_q // meta["BLOCK_M"]), batch * heads)  # noqa: E731
        kernels.attn_fwd_kernel[grid](
            q, k, v, out, lse, sm_scale, heads, n_q, n_kv, head_dim, *_strides(q, k, v, out),
            CAUSAL=causal, **_options(kernels, q),
        )  # fmt: skip
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        return out

    @staticmethod
    def backward(ctx, grad_out):  # noqa: ANN001, ANN205
        kernels = kernels_module()
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = _unit_last_stride(grad_out)
        batch, heads, n_q, head_dim = q.shape
        n_kv = k.shape[2]
        # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij, the softmax backward's row term.
        delta = (grad_out.float() * out.float()).sum(-1).reshape(batch * heads, n_q)
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        dk, dv = (torch.empty(k.shape, dtype=k.dtype, device=k.device) for _ in range(2))
        sizes = (heads, n_q, n_kv, head_dim)
        options = {**_options(kernels, q), "CAUSAL": ctx.causal}
        sm_scale = head_dim**-0.5
        kv_grid = lambda meta: (-(-n_kv // meta["BLOCK_N"]), batch * heads)  # noqa: E731
        kernels.attn_bwd_dkdv_kernel[kv_grid](
            q, k, v, grad_out, lse, delta, dk, dv, sm_scale, *sizes, *_strides(q, k, v, grad_out, dk), **options
        )
        q_grid = lambda meta: (-(-n_q // meta["BLOCK_M"]), batch * heads)  # noqa: E731
        kernels.attn_bwd_dq_kernel[q_grid](
            q, k, v, grad_out, lse, delta, dq, sm_scale, *sizes, *_strides(q, k, v, grad_out, dq), **options
        )
        return dq, dk, dv, None
