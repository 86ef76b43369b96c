"""Triton kernels for InfoNCE: one pass over key tiles per query block with an online log-sum-exp.

Forward writes per query only its LSE and its loss (LSE - positive logit); the two backward kernels
recompute the logit tiles, form softmax - onehot(positive) and reduce it against k (for dq, one
program per query block) or against q (for dk, one program per key block), so neither needs atomics.
With HAS_EXCLUDE each query leaves one key (EXCL[i], SimCLR's own view) out of its softmax.
Rows are L2-normalized in fp32 as they are loaded and the normalization's backward is applied before
the store. Dot operands are cast to the input dtype (tensor cores) and accumulate in fp32; `DOT_F32`
keeps them in fp32 instead, which the interpreter needs for bf16 (its bf16 tl.dot is wrong).

Launch through kernels.infonce.triton_infonce, which picks block sizes under the interpreter.
"""

import triton
import triton.language as tl

from kernels.triton_support import autotune_unless_interpreted, interpreting

INTERPRETED = interpreting()

_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in ((64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (128, 128, 8, 3))
]
_KEY = ["N", "M", "BLOCK_D"]


@triton.jit
def _load_unit_rows(ptr, rows, dims, num_rows, dim, stride, NORMALIZE: tl.constexpr):
    """Rows of a [num_rows, dim] matrix as fp32, zero-padded, divided by max(|row|, 1e-12) if NORMALIZE."""
    mask = (rows[:, None] < num_rows) & (dims[None, :] < dim)
    x = tl.load(ptr + rows[:, None] * stride + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=1))
    if NORMALIZE:
        x = x / tl.maximum(norm, 1e-12)[:, None]
    return x, norm


@triton.jit
def _load_exclude(ptr, rows, num_rows, HAS_EXCLUDE: tl.constexpr):
    """Each row's excluded key (SimCLR: the row itself), or -1 (none) when there is no EXCL tensor."""
    if HAS_EXCLUDE:
        return tl.load(ptr + rows, mask=rows < num_rows, other=-1)
    return tl.full(rows.shape, -1, tl.int64)


@triton.jit
def _dot(a, b, dot_ty: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_F32:
        return tl.dot(a, b, input_precision=INPUT_PRECISION)
    return tl.dot(a.to(dot_ty), b.to(dot_ty), input_precision=INPUT_PRECISION)


@triton.jit
def _unit_rows_backward(grad, unit, norm, NORMALIZE: tl.constexpr):
    """Gradient through x -> x / max(|x|, eps): drop the radial part, divide by the norm."""
    if NORMALIZE:
        radial = tl.where(norm[:, None] > 1e-12, unit * tl.sum(unit * grad, axis=1)[:, None], 0.0)
        grad = (grad - radial) / tl.maximum(norm, 1e-12)[:, None]
    return grad


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def infonce_fwd_kernel(
    Q, K, POS, EXCL, LSE, LOSS, N, M, D, stride_q, stride_k, inv_temp,
    NORMALIZE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q, _ = _load_unit_rows(Q, rows, dims, N, D, stride_q, NORMALIZE)
    pos = tl.load(POS + rows, mask=rows < N, other=-1)
    excl = _load_exclude(EXCL, rows, N, HAS_EXCLUDE)
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    positive = tl.zeros((BLOCK_M,), tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, _ = _load_unit_rows(K, cols, dims, M, D, stride_k, NORMALIZE)
        logits = _dot(q, tl.trans(k), K.dtype.element_ty, DOT_F32, INPUT_PRECISION) * inv_temp
        logits = tl.where((cols[None, :] < M) & (cols[None, :] != excl[:, None]), logits, float("-inf"))
        positive += tl.sum(tl.where(cols[None, :] == pos[:, None], logits, 0.0), axis=1)
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        # A row whose keys so far are all excluded has max -inf: shift by 0 there, not by -inf.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        running_sum = running_sum * tl.exp(running_max - shift) + tl.sum(tl.exp(logits - shift[:, None]), axis=1)
        running_max = new_max
    lse = running_max + tl.log(running_sum)
    tl.store(LSE + rows, lse, mask=rows < N)
    tl.store(LOSS + rows, lse - positive, mask=rows < N)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def infonce_bwd_dq_kernel(
    Q, K, POS, EXCL, LSE, GRAD, DQ, N, M, D, stride_q, stride_k, stride_dq, inv_temp,
    NORMALIZE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    q, q_norm = _load_unit_rows(Q, rows, dims, N, D, stride_q, NORMALIZE)
    pos = tl.load(POS + rows, mask=rows < N, other=-1)
    excl = _load_exclude(EXCL, rows, N, HAS_EXCLUDE)
    lse = tl.load(LSE + rows, mask=rows < N, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, M, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k, _ = _load_unit_rows(K, cols, dims, M, D, stride_k, NORMALIZE)
        logits = _dot(q, tl.trans(k), K.dtype.element_ty, DOT_F32, INPUT_PRECISION) * inv_temp
        # Padded rows and columns get a zero gradient (their norm is 0, and 0 / eps must stay 0).
        valid = (rows[:, None] < N) & (cols[None, :] < M) & (cols[None, :] != excl[:, None])
        probs = tl.where(valid, tl.exp(logits - lse[:, None]), 0.0)
        dlogits = probs - tl.where(cols[None, :] == pos[:, None], 1.0, 0.0)
        acc += _dot(dlogits, k, K.dtype.element_ty, DOT_F32, INPUT_PRECISION)
    acc = acc * (tl.load(GRAD) * inv_temp / N)
    dq = _unit_rows_backward(acc, q, q_norm, NORMALIZE)
    mask = (rows[:, None] < N) & (dims[None, :] < D)
    tl.store(DQ + rows[:, None] * stride_dq + dims[None, :], dq.to(DQ.dtype.element_ty), mask=mask)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def infonce_bwd_dk_kernel(
    Q, K, POS, EXCL, LSE, GRAD, DK, N, M, D, stride_q, stride_k, stride_dk, inv_temp,
    NORMALIZE: tl.constexpr, HAS_EXCLUDE: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    k, k_norm = _load_unit_rows(K, cols, dims, M, D, stride_k, NORMALIZE)
    acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q, _ = _load_unit_rows(Q, rows, dims, N, D, stride_q, NORMALIZE)
        pos = tl.load(POS + rows, mask=rows < N, other=-1)
        excl = _load_exclude(EXCL, rows, N, HAS_EXCLUDE)
        lse = tl.load(LSE + rows, mask=rows < N, other=0.0)
        logits_t = _dot(k, tl.trans(q), K.dtype.element_ty, DOT_F32, INPUT_PRECISION) * inv_temp
        valid = (cols[:, None] < M) & (rows[None, :] < N) & (cols[:, None] != excl[None, :])
        probs_t = tl.where(valid, tl.exp(logits_t - lse[None, :]), 0.0)
        dlogits_t = probs_t - tl.where(cols[:, None] == pos[None, :], 1.0, 0.0)
        acc += _dot(dlogits_t, q, K.dtype.element_ty, DOT_F32, INPUT_PRECISION)
    acc = acc * (tl.load(GRAD) * inv_temp / N)
    dk = _unit_rows_backward(acc, k, k_norm, NORMALIZE)
    mask = (cols[:, None] < M) & (dims[None, :] < D)
    tl.store(DK + cols[:, None] * stride_dk + dims[None, :], dk.to(DK.dtype.element_ty), mask=mask)
