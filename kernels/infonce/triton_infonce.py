"""Autograd wrapper and launcher for the Triton InfoNCE kernels (CUDA, or the CPU through the interpreter)."""

from __future__ import annotations

import torch
from torch import Tensor

from kernels.infonce.reference import _check_inputs, default_positives

# Under the interpreter each tile step costs milliseconds whatever its size, and autotuning is off.
INTERPRETER_BLOCKS = {"BLOCK_M": 32, "BLOCK_N": 32}


def kernels_module():
    """The kernel module; imported on first use so that importing kernels never imports triton."""
    from kernels.infonce import triton_kernels

    return triton_kernels


def info_nce_triton(
    q: Tensor,
    k: Tensor,
    temperature: float,
    positives: Tensor | None = None,
    normalize: bool = True,
    exclude: Tensor | None = None,
) -> Tensor:
    """The fused kernels; CUDA tensors, or CPU tensors when the kernels run interpreted."""
    _check_inputs(q, k, temperature, positives, exclude)
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(
            f"info_nce impl='triton' computes in float32 for fp32/fp16/bf16, got {q.dtype}; use impl='tiled'"
        )
    kernels = kernels_module()
    if q.device.type != "cuda" and not kernels.INTERPRETED:
        raise RuntimeError(
            f"info_nce impl='triton' needs CUDA tensors (got {q.device.type}), or TRITON_INTERPRET=1 to run the "
            "kernels on the CPU through the Triton interpreter; impl='tiled' is the CPU path"
        )
    if positives is None:
        positives = default_positives(q.shape[0], q.device)
    return _TritonInfoNCE.apply(q, k, positives, exclude, float(temperature), normalize)


def _launch_options(kernels, x: Tensor) -> tuple[dict, object]:
    """Constexprs shared by the three kernels, and the grid's block-size lookup."""
    options = {
        "BLOCK_D": max(16, 1 << (x.shape[1] - 1).bit_length()),
        # bf16 tl.dot is wrong under the interpreter; fp32 inputs get true fp32 dots, not tf32.
        "DOT_F32": kernels.INTERPRETED and x.dtype == torch.bfloat16,
        "INPUT_PRECISION": "ieee" if x.dtype == torch.float32 else "tf32",
    }
    if kernels.INTERPRETED:
        options.update(INTERPRETER_BLOCKS)
    return options


class _TritonInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, positives, exclude, temperature, normalize):  # noqa: ANN001, ANN205
        kernels = kernels_module()
        q, k, positives = q.contiguous(), k.contiguous(), positives.contiguous()
        has_exclude = exclude is not None
        # Without exclusion the kernels never read EXCL (HAS_EXCLUDE is a constexpr); pass positives as a stand-in.
        exclude = exclude.to(positives.dtype).contiguous() if has_exclude else positives
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        lse = torch.empty(n, dtype=torch.float32, device=q.device)
        row_loss = torch.empty(n, dtype=torch.float32, device=q.device)
        options = _launch_options(kernels, q)
        grid = lambda meta: (triton_cdiv(n, meta["BLOCK_M"]),)  # noqa: E731
        kernels.infonce_fwd_kernel[grid](
            q, k, positives, exclude, lse, row_loss, n, m, d, q.stride(0), k.stride(0), 1.0 / temperature,
            NORMALIZE=normalize, HAS_EXCLUDE=has_exclude, **options,
        )  # fmt: skip
        ctx.save_for_backward(q, k, positives, exclude, lse)
        ctx.config = (temperature, normalize, has_exclude)
        return row_loss.mean()

    @staticmethod
    def backward(ctx, grad_loss):  # noqa: ANN001, ANN205
        kernels = kernels_module()
        q, k, positives, exclude, lse = ctx.saved_tensors
        temperature, normalize, has_exclude = ctx.config
        n, m, d = q.shape[0], k.shape[0], q.shape[1]
        grad = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
        options = _launch_options(kernels, q)
        dq = dk = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(q)
            kernels.infonce_bwd_dq_kernel[lambda meta: (triton_cdiv(n, meta["BLOCK_M"]),)](
                q, k, positives, exclude, lse, grad, dq, n, m, d, q.stride(0), k.stride(0), dq.stride(0),
                1.0 / temperature, NORMALIZE=normalize, HAS_EXCLUDE=has_exclude, **options,
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            dk = torch.empty_like(k)
            kernels.infonce_bwd_dk_kernel[lambda meta: (triton_cdiv(m, meta["BLOCK_N"]),)](
                q, k, positives, exclude, lse, grad, dk, n, m, d, q.stride(0), k.stride(0), dk.stride(0),
                1.0 / temperature, NORMALIZE=normalize, HAS_EXCLUDE=has_exclude, **options,
            )  # fmt: skip
        return dq, dk, None, None, None, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
