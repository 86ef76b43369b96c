"""Triton kernels for attention of q [B, H, N_Q, D] over k, v [B, H, N_KV, D], non-causal or causal:
flash-attention forward and a two-kernel backward.

Forward: one program per (query block, batch x head) streams key/value blocks through an online
softmax and writes the output and the per-row log-sum-exp. Backward recomputes the probabilities
from that LSE: one kernel per key block accumulates dk and dv over all queries, one per query block
accumulates dq, so no atomics are needed. With `CAUSAL`, query row i sees key columns
j <= i + N_KV - N_Q (the queries are the last N_Q positions; the launcher ensures N_Q <= N_KV):
scores above that diagonal are masked to -inf (probabilities to 0), and key blocks entirely after a
query block (forward, dq) or query blocks entirely before a key block (dk/dv) are never visited, so
causal attention does about half the work. Without `CAUSAL` the code is the plain non-causal loop.
N need not be a multiple of the blocks (ViT: 197, 257) and
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
_KEY = ["N_Q", "N_KV", "BLOCK_D", "CAUSAL"]


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
    Q, K, V, OUT, LSE, sm_scale, H, N_Q, N_KV, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qn, N_Q, HEAD_DIM)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    running_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    running_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = N_KV
    if CAUSAL:
        # The block's last row sees keys up to start_m + BLOCK_M - 1 + N_KV - N_Q; later blocks are all masked.
        # Every row sees key 0, so the first block makes each running max finite.
        hi = tl.minimum(N_KV, start_m + BLOCK_M + (N_KV - N_Q))
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, stride_kn, N_KV, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, stride_vn, N_KV, HEAD_DIM)
        scores = _dot(q, tl.trans(k), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        scores = tl.where(cols[None, :] < N_KV, scores, float("-inf"))
        if CAUSAL:
            scores = tl.where(cols[None, :] <= rows[:, None] + (N_KV - N_Q), scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp(running_max - new_max)
        probs = tl.exp(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        acc = acc * rescale[:, None] + _dot(probs, v, dot_ty, DOT_F32, INPUT_PRECISION)
        running_max = new_max
    out = acc / running_sum[:, None]
    _store_tile(OUT + b * stride_ob + h * stride_oh, rows, dims, stride_on, N_Q, HEAD_DIM, out)
    tl.store(LSE + bh * N_Q + rows, running_max + tl.log(running_sum), mask=rows < N_Q)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, sm_scale, H, N_Q, N_KV, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dk and dv for one key block; DK and DV share the contiguous layout strides stride_g*."""
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    start_n = tl.program_id(0) * BLOCK_N
    cols = start_n + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    k = _load_tile(K + b * stride_kb + h * stride_kh, cols, dims, stride_kn, N_KV, HEAD_DIM)
    v = _load_tile(V + b * stride_vb + h * stride_vh, cols, dims, stride_vn, N_KV, HEAD_DIM)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    lo = 0
    if CAUSAL:
        # Rows before start_n - (N_KV - N_Q) see none of this block's keys: start at the query block holding it.
        lo = tl.maximum(start_n - (N_KV - N_Q), 0) // BLOCK_M * BLOCK_M
    for start in range(lo, N_Q, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, dims, stride_qn, N_Q, HEAD_DIM)
        do = _load_tile(do_base, rows, dims, stride_don, N_Q, HEAD_DIM)
        lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
        scores_t = _dot(k, tl.trans(q), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        valid = (cols[:, None] < N_KV) & (rows[None, :] < N_Q)
        if CAUSAL:
            valid = valid & (cols[:, None] <= rows[None, :] + (N_KV - N_Q))
        probs_t = tl.where(valid, tl.exp(scores_t - lse[None, :]), 0.0)
        dv += _dot(probs_t, do, dot_ty, DOT_F32, INPUT_PRECISION)
        dprobs_t = _dot(v, tl.trans(do), dot_ty, DOT_F32, INPUT_PRECISION)
        dscores_t = probs_t * (dprobs_t - delta[None, :])
        dk += _dot(dscores_t, q, dot_ty, DOT_F32, INPUT_PRECISION)
    grad_offset = b * stride_gb + h * stride_gh
    _store_tile(DK + grad_offset, cols, dims, stride_gn, N_KV, HEAD_DIM, dk * sm_scale)
    _store_tile(DV + grad_offset, cols, dims, stride_gn, N_KV, HEAD_DIM, dv)


@autotune_unless_interpreted(_CONFIGS, _KEY)
@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, sm_scale, H, N_Q, N_KV, HEAD_DIM,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn, stride_dob, stride_doh, stride_don,
    stride_gb, stride_gh, stride_gn,
    CAUSAL: tl.constexpr, DOT_F32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    start_m = tl.program_id(0) * BLOCK_M
    rows = start_m + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    dot_ty = Q.dtype.element_ty
    q = _load_tile(Q + b * stride_qb + h * stride_qh, rows, dims, stride_qn, N_Q, HEAD_DIM)
    do = _load_tile(DO + b * stride_dob + h * stride_doh, rows, dims, stride_don, N_Q, HEAD_DIM)
    lse = tl.load(LSE + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    delta = tl.load(DELTA + bh * N_Q + rows, mask=rows < N_Q, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    hi = N_KV
    if CAUSAL:
        hi = tl.minimum(N_KV, start_m + BLOCK_M + (N_KV - N_Q))  # as in the forward: later key blocks are masked
    for start in range(0, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, stride_kn, N_KV, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, stride_vn, N_KV, HEAD_DIM)
        scores = _dot(q, tl.trans(k), dot_ty, DOT_F32, INPUT_PRECISION) * sm_scale
        valid = (rows[:, None] < N_Q) & (cols[None, :] < N_KV)
        if CAUSAL:
            valid = valid & (cols[None, :] <= rows[:, None] + (N_KV - N_Q))
        probs = tl.where(valid, tl.exp(scores - lse[:, None]), 0.0)
        dprobs = _dot(do, tl.trans(v), dot_ty, DOT_F32, INPUT_PRECISION)
        dscores = probs * (dprobs - delta[:, None])
        dq += _dot(dscores, k, dot_ty, DOT_F32, INPUT_PRECISION)
    _store_tile(DQ + b * stride_gb + h * stride_gh, rows, dims, stride_gn, N_Q, HEAD_DIM, dq * sm_scale)
