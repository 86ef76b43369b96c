"""Causal attention (`attention(..., causal=True)`): every backend agrees with the float32 reference, is causal
(checked through gradients), follows the KV-cache convention when there are fewer queries than keys, and
leaves causal=False exactly as it was.

The triton backend runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported; this module sets it too, for runs without the conftest), so shapes are tiny.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run this test module on its own")
os.environ["TRITON_INTERPRET"] = "1"

import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import kernels.attention.triton_attention as triton_attention_module  # noqa: E402
from kernels.attention import attention, available_backends, reference_attention, sdpa_attention  # noqa: E402
from kernels.attention.xformers_attention import memory_efficient, xformers_attention  # noqa: E402

# The backends that run on CPU tensors here: triton through the interpreter when installed.
BACKENDS = [name for name in ("reference", "sdpa", "triton") if name in available_backends()]
TOLERANCES = {torch.float32: dict(atol=1e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=1e-2)}
needs_triton = pytest.mark.skipif("triton" not in available_backends(), reason="triton is not installed")


def _tensors(shape_q, shape_kv=None, dtype=torch.float32, seed=0):  # noqa: ANN001, ANN202
    """q [shape_q], k and v [shape_kv] (default: shape_q) and an upstream gradient shaped like q."""
    shape_kv = shape_kv or shape_q
    generator = torch.Generator().manual_seed(seed)
    q, k, v, upstream = (torch.randn(s, generator=generator).to(dtype) for s in (shape_q, shape_kv, shape_kv, shape_q))
    return q, k, v, upstream


def _output_and_grads(backend, q, k, v, upstream, causal=True):  # noqa: ANN001, ANN202
    """Output and q, k, v gradients; causal=None calls `attention` without the argument."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    options = {} if causal is None else {"causal": causal}
    out = attention(q, k, v, backend=backend, **options)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


def _row_by_row(q, k, v):  # noqa: ANN001, ANN202
    """Causal attention written one query at a time: query i (the last Nq of Nk positions) sees keys 0..i+Nk-Nq."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    rows = []
    for i in range(n_q):
        seen = i + n_k - n_q + 1
        weights = torch.softmax(q[..., i : i + 1, :] @ k[..., :seen, :].transpose(-2, -1) / q.shape[-1] ** 0.5, -1)
        rows.append(weights @ v[..., :seen, :])
    return torch.cat(rows, dim=-2)


# ------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize(("n_q", "n_k"), [(7, 7), (3, 9), (1, 9)])
def test_reference_is_causal_softmax_attention(n_q: int, n_k: int) -> None:
    q, k, v, _ = _tensors((2, 2, n_q, 8), (2, 2, n_k, 8), dtype=torch.float64)
    torch.testing.assert_close(reference_attention(q, k, v, causal=True), _row_by_row(q, k, v), atol=1e-12, rtol=0)
    # The low-precision answer is the float32 math rounded once.
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    expected = _row_by_row(*(t.float() for t in half)).to(torch.bfloat16)
    torch.testing.assert_close(reference_attention(*half, causal=True), expected, atol=0, rtol=0)


# ------------------------------------------------------------------------------------- backends agree


@pytest.mark.parametrize(
    ("backend", "shape", "dtype"),
    [
        ("sdpa", (2, 2, 37, 16), torch.float32),
        pytest.param("triton", (2, 2, 37, 16), torch.float32, marks=needs_triton),  # 37: two 32-blocks, one partial
        pytest.param("triton", (1, 2, 70, 16), torch.float32, marks=needs_triton),  # three blocks: skips two tiles
        pytest.param("triton", (1, 2, 37, 16), torch.float16, marks=needs_triton),
        pytest.param("triton", (1, 1, 20, 24), torch.float32, marks=needs_triton),  # D padded to 32, one block
    ],
)
def test_causal_matches_reference(backend: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    q, k, v, upstream = _tensors(shape, dtype=dtype)
    expected = _output_and_grads("reference", q, k, v, upstream)
    actual = _output_and_grads(backend, q, k, v, upstream)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), **TOLERANCES[dtype])
    # Not the non-causal answer (which would also be a valid attention output of the right shape).
    non_causal = reference_attention(q, k, v)
    assert (actual[0].float() - non_causal.float()).abs().amax() > 0.05


# ------------------------------------------------------------------------------------- causality


def _grads_of_row(backend, q, k, v, i, causal):  # noqa: ANN001, ANN202
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    attention(q, k, v, backend=backend, causal=causal)[..., i, :].sum().backward()
    return q.grad, k.grad, v.grad


def _nonzero_positions(grad: torch.Tensor) -> torch.Tensor:
    """Per sequence position, whether any batch, head or channel of the gradient is nonzero."""
    return (grad != 0).any(dim=-1).any(dim=0).any(dim=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_depends_only_on_earlier_positions(backend: str) -> None:
    n = 37
    q, k, v, _ = _tensors((1, 2, n, 16), seed=3)
    for i in (0, 1, 20, 31, 32, n - 1):  # around the 32-row tile boundary of the interpreted kernel
        dq, dk, dv = (_nonzero_positions(g) for g in _grads_of_row(backend, q, k, v, i, causal=True))
        for name, nonzero in (("q", dq), ("k", dk), ("v", dv)):
            assert not nonzero[i + 1 :].any(), f"{backend}: d out[{i}] / d {name} is nonzero after position {i}"
        assert dv[: i + 1].all(), f"{backend}: out[{i}] does not depend on every v[j], j <= {i}"
        if i > 0:  # out[0] = v[0]: with one key the softmax weight is 1 whatever q[0] and k[0] are
            assert dq[i], f"{backend}: out[{i}] does not depend on q[{i}]"
            assert dk[: i + 1].any(), f"{backend}: out[{i}] does not depend on k"


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_causal_output_depends_on_later_positions(backend: str) -> None:
    """The control for the test above: without the mask the same check sees the future."""
    q, k, v, _ = _tensors((1, 2, 37, 16), seed=3)
    _, dk, dv = (_nonzero_positions(g) for g in _grads_of_row(backend, q, k, v, 20, causal=False))
    assert dk[21:].all() and dv[21:].all()


# ------------------------------------------------------------------------------------- KV cache: Nq < Nk


@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_queries_are_the_last_positions(backend: str) -> None:
    q, k, v, upstream = _tensors((2, 2, 37, 16), seed=4)
    full = attention(q, k, v, backend="reference", causal=True)
    for n_q in (1, 4, 33):  # one decoding step, a few, and more than one query tile
        out = attention(q[..., -n_q:, :], k, v, backend=backend, causal=True)
        assert out.shape == (2, 2, n_q, 16)
        torch.testing.assert_close(out, full[..., -n_q:, :], atol=1e-5, rtol=1e-4)
    # Gradients with Nq < Nk agree with the reference too (a decoder trained on a cached prefix).
    expected = _output_and_grads("reference", q[..., -5:, :], k, v, upstream[..., -5:, :])
    actual = _output_and_grads(backend, q[..., -5:, :], k, v, upstream[..., -5:, :])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    assert (actual[2][..., :-5, :] != 0).any()  # the cached prefix's values get gradient, not only the new keys'


@pytest.mark.parametrize("backend", BACKENDS)
def test_more_queries_than_keys_is_an_error_when_causal(backend: str) -> None:
    q, k, v, _ = _tensors((1, 2, 9, 16), (1, 2, 5, 16))
    with pytest.raises(ValueError, match=r"at most as many queries as keys.*Nq=9 > Nk=5"):
        attention(q, k, v, backend=backend, causal=True)


# ------------------------------------------------------------------------------------- causal=False unchanged


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_false_is_the_non_causal_attention(backend: str) -> None:
    q, k, v, upstream = _tensors((2, 2, 37, 16), seed=5)
    default = _output_and_grads(backend, q, k, v, upstream, causal=None)
    explicit = _output_and_grads(backend, q, k, v, upstream, causal=False)
    for d, e in zip(default, explicit):
        assert torch.equal(d, e)
    weights = torch.softmax(q @ k.transpose(-2, -1) / 4.0, dim=-1)
    torch.testing.assert_close(explicit[0], weights @ v, atol=1e-5, rtol=1e-4)
    if backend == "sdpa":
        assert torch.equal(explicit[0], F.scaled_dot_product_attention(q, k, v))


@needs_triton
def test_triton_non_causal_with_fewer_queries_matches_reference() -> None:
    q, k, v, upstream = _tensors((1, 2, 5, 16), (1, 2, 37, 16), seed=6)
    expected = _output_and_grads("reference", q, k, v, upstream, causal=False)
    actual = _output_and_grads("triton", q, k, v, upstream, causal=False)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- the triton kernel's work


@needs_triton
@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_triton_causal_skips_tiles_above_the_diagonal() -> None:
    """Tiles that are never visited cannot spread a NaN: a visited, masked tile would (0 * NaN = NaN)."""
    block = triton_attention_module.INTERPRETER_BLOCKS
    assert block["BLOCK_M"] == block["BLOCK_N"] == 32
    q, k, v, _ = _tensors((1, 2, 64, 16), seed=7)

    # Forward and dq: the first query block never loads the second key block.
    k_nan, v_nan = k.clone(), v.clone()
    k_nan[..., 32:, :], v_nan[..., 32:, :] = float("nan"), float("nan")
    upstream = torch.zeros_like(q)
    upstream[..., :32, :] = 1.0
    out, dq, _, _ = _output_and_grads("triton", q, k_nan, v_nan, upstream)
    assert out[..., :32, :].isfinite().all() and dq[..., :32, :].isfinite().all()
    assert out[..., 32:, :].isnan().all()
    non_causal_out = _output_and_grads("triton", q, k_nan, v_nan, upstream, causal=False)[0]
    assert non_causal_out[..., :32, :].isnan().all()  # the control: the same NaN reaches a tile that is visited

    # dk and dv: the second key block never loads the first query block.
    q_nan = q.clone()
    q_nan[..., :32, :] = float("nan")
    _, _, dk, dv = _output_and_grads("triton", q_nan, k, v, torch.ones_like(q))
    assert dk[..., 32:, :].isfinite().all() and dv[..., 32:, :].isfinite().all()
    assert (dv[..., 32:, :] != 0).all()
    assert dk[..., :32, :].isnan().all()


def test_triton_on_cpu_without_interpreter_passes_causal_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_attention_module, "kernels_module", lambda: pytest.fail("kernel launched on CPU"))
    q, k, v, _ = _tensors((1, 2, 9, 16))
    for n_q in (9, 2):  # self-attention, and the last two positions against all nine keys
        out = attention(q[..., -n_q:, :], k, v, backend="triton", causal=True)
        assert torch.equal(out, sdpa_attention(q[..., -n_q:, :], k, v, causal=True))
        expected = reference_attention(q, k, v, causal=True)[..., -n_q:, :]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------- xformers


def _fake_xformers(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """xformers.ops' contract: [B, N, H, D] in and out, causal through attn_bias=LowerTriangularMask()."""

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, **kwargs):  # noqa: ANN001, ANN003, ANN202
        calls.append((q.shape, kwargs))
        bias = kwargs.get("attn_bias")
        assert bias is None or isinstance(bias, LowerTriangularMask)
        causal = bias is not None
        return reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal).transpose(1, 2)

    package = types.ModuleType("xformers")
    package.ops = types.SimpleNamespace(
        memory_efficient_attention=memory_efficient_attention, LowerTriangularMask=LowerTriangularMask
    )
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", package.ops)


def test_xformers_causal_passes_the_lower_triangular_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_xformers(monkeypatch, calls)
    q, k, v, _ = _tensors((2, 3, 11, 8))
    torch.testing.assert_close(memory_efficient(q, k, v, causal=True), reference_attention(q, k, v, causal=True))
    torch.testing.assert_close(memory_efficient(q, k, v), reference_attention(q, k, v))
    assert [shape for shape, _ in calls] == [(2, 11, 3, 8)] * 2
    assert type(calls[0][1]["attn_bias"]).__name__ == "LowerTriangularMask"
    assert calls[1][1] == {}  # non-causal calls exactly as before


def test_xformers_on_cpu_passes_causal_to_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_xformers(monkeypatch, calls)
    q, k, v, _ = _tensors((1, 2, 9, 16))
    assert torch.equal(xformers_attention(q, k, v, causal=True), sdpa_attention(q, k, v, causal=True))
    assert not torch.equal(xformers_attention(q, k, v, causal=True), xformers_attention(q, k, v))
    assert calls == []
    with pytest.raises(ValueError, match=r"xformers .* causal=True only with as many queries as keys"):
        xformers_attention(q[..., -3:, :], k, v, causal=True)
