"""Triton kernels for non-causal attention over [B, H, N, D]: flash-attention forward and a two-kernel backward.

Forward: one program per (query block, batch x head) streams key/value blocks through an online
softmax and writes the output and the per-row log-sum-exp. Backward recomputes the probabilities
from that LSE: one kernel per key block accumulates dk and dv over all queries, one per query block
accumulates dq, so no atomics are needed. N need not be a multiple of the blocks (ViT: 197, 257) and
D is padded to a power of two >= 16 with masks (D = 72 or 80 compute as 128). Softmax statistics and
accumulators are fp32; dot operands are the input dtype (fp32 inputs use true fp32 dots, not tf32),
or fp32 under `DOT_F32` (the interpreter's bf16 tl.dot is wrong).

Launch through kernels.attention.triton_attention, which picks block sizes under the interpreter.
"""

import triton
import triton.language as tl

from kernels.triton_support import autotune_unless_interpreted, interpreting

INTERPRETED = interpreting()

_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_m, block_n, warps, stages in ((64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 2))
]
_KEY = ["N_CTX", "BLOCK_D"]


@triton.jit
def _load_tile(base, rows, dims, stride_n, n_ctx, head_dim):
    mask = (rows[:, None] < n_ctx) & (dims[None, :] < head_dim)
    return tl.load(base + rows[:, None] * stride_n + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, dims, stride_n, n_ctx, head_dim, value):
    mask = (rows[:, None] < n_ctx) & (dims[None, :] < head_dim)
    tl.store(base + rows[:, None] * stride_n + dims[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _dot(a, b, dot_ty: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    if DOT_F32:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=INPUT_PRECISION)
    return tl.dot(a.to(dot_ty), b.to(dot_ty), input_precision=INPUT_PRECISION)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def attn_fwd_kernel(
    Q, K, V, OUT, LSE, sm_scale, H, N_CTX, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qn, N_CTX, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N_CTX, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, stride_kn, N_CTX, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, stride_vn, N_CTX, HEAD_DIM)
        scores = _dot(q, tl.trans(k), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        scores = tl.where(cols[None, :] < N_CTX, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs, v, dot_ty, DOT_F32, INPUT_PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    _store_tile(OUT + b * stride_ob + h * stride_oh, rows, dims, stride_on, N_CTX, HEAD_DIM, out)
    tl.store(LSE + bh * N_CTX + rows, running_max + tl.log(running_sum), mask=rows < N_CTX)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, H, N_CTX, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dk and dv for one key block; DK and DV share the contiguous layout strides stride_g*."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    k = _load_tile(K + b * stride_kb + h * stride_kh, cols, dims, stride_kn, N_CTX, HEAD_DIM)
    v = _load_tile(V + b * stride_vb + h * stride_vh, cols, dims, stride_vn, N_CTX, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start in range(0, N_CTX, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, dims, stride_qn, N_CTX, HEAD_DIM)
        do = _load_tile(do_base, rows, dims, stride_don, N_CTX, HEAD_DIM)
        lse = tl.load(LSE + bh * N_CTX + rows, mask=rows < N_CTX, other=0.0)
        delta = tl.load(DELTA + bh * N_CTX + rows, mask=rows < N_CTX, other=0.0)
        scores_t = _dot(k, tl.trans(q), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        valid = (cols[:, None] < N_CTX) & (rows[None, :] < N_CTX)
        probs_t = tl.where(valid, tl.exp(scores_t - lse[None, :]), 0.0)
        dv += _dot(probs_t, do, dot_ty, DOT_F32, INPUT_PRECISION)
        dprobs_t = _dot(v, tl.trans(do), dot_ty, DOT_F32, INPUT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += _dot(dscores_t, q, dot_ty, DOT_F32, INPUT_PRECISION)
    grad_offset = b * stride_gb + h * stride_gh
    _store_tile(DK + grad_offset, cols, dims, stride_gn, N_CTX, HEAD_DIM, dk * sm_scale)
    _store_tile(DV + grad_offset, cols, dims, stride_gn, N_CTX, HEAD_DIM, dv)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, H, N_CTX, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qn, N_CTX, HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, dims, stride_don, N_CTX, HEAD_DIM)
    lse = tl.load(LSE + bh * N_CTX + rows, mask=rows < N_CTX, other=0.0)
    delta = tl.load(DELTA + bh * N_CTX + rows, mask=rows < N_CTX, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, N_CTX, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, stride_kn, N_CTX, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, stride_vn, N_CTX, HEAD_DIM)
        scores = _dot(q, tl.trans(k), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        valid = (rows[:, None] < N_CTX) & (cols[None, :] < N_CTX)
        probs = tl.where(valid, tl.exp(scores - lse[:, None]), 0.0)
        dprobs = _dot(do, tl.trans(v), dot_ty, DOT_F32, INPUT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += _dot(dscores, k, dot_ty, DOT_F32, INPUT_PRECISION)
    _store_tile(DQ + b * stride_gb + h * stride_gh, rows, dims, stride_gn, N_CTX, HEAD_DIM, dq * sm_scale)
