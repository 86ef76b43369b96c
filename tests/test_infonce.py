"""InfoNCE: the tiled PyTorch path and the Triton kernels (interpreted on the CPU) agree with the formula.

Triton decides whether to interpret when it is imported, so tests/conftest.py sets TRITON_INTERPRET=1
before anything in the process imports triton (DeepSpeed imports it early); this module sets it too,
for runs without the conftest. If triton was already imported for the GPU, this module refuses to run rather than
testing the wrong thing.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run tests/test_infonce.py on its own")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import kernels.infonce as infonce_module  # noqa: E402
from kernels.infonce import info_nce, info_nce_reference, info_nce_tiled  # noqa: E402

FP32 = dict(atol=2e-5, rtol=1e-4)


def _inputs(n: int, m: int, d: int, dtype=torch.float32, seed: int = 0, scale: float = 1.0):
    generator = torch.Generator().manual_seed(seed)
    q = (torch.randn(n, d, generator=generator) * scale).to(dtype).requires_grad_()
    k = (torch.randn(m, d, generator=generator) * scale).to(dtype).requires_grad_()
    return q, k


def _loss_and_grads(fn, q, k, *args, **kwargs):
    q, k = q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    loss = fn(q, k, *args, **kwargs)
    loss.backward()
    return loss.detach(), q.grad, k.grad


def _assert_same(actual, expected, **tolerances) -> None:
    for a, e in zip(actual, expected):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a.float(), e.float(), **tolerances)


# ------------------------------------------------------------------------------------- the formula


def test_reference_is_the_cross_entropy_written_out() -> None:
    q, k = _inputs(5, 7, 4, torch.float64)
    positives = torch.tensor([6, 0, 2, 2, 5])
    qn, kn = q / q.norm(dim=1, keepdim=True), k / k.norm(dim=1, keepdim=True)
    logits = qn @ kn.T / 0.3
    expected = torch.stack([logits[i].logsumexp(0) - logits[i, p] for i, p in enumerate(positives)]).mean()
    torch.testing.assert_close(info_nce_reference(q, k, 0.3, positives), expected, atol=1e-12, rtol=1e-12)


# ------------------------------------------------------------------------------------- tiled PyTorch


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize(
    ("n", "m", "d", "block_q", "block_k"),
    [(33, 33, 16, 8, 8), (197, 260, 32, 64, 48), (50, 400, 24, 1024, 1024), (7, 3, 5, 2, 2)],
)
def test_tiled_matches_reference(n: int, m: int, d: int, block_q: int, block_k: int, normalize: bool) -> None:
    q, k = _inputs(n, m, d, scale=0.5)
    positives = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(1))
    expected = _loss_and_grads(info_nce_reference, q, k, 0.1, positives, normalize)
    actual = _loss_and_grads(info_nce_tiled, q, k, 0.1, positives, normalize, block_q=block_q, block_k=block_k)
    _assert_same(actual, expected, **FP32)


@pytest.mark.parametrize("normalize", [True, False])
def test_tiled_gradcheck_float64(normalize: bool) -> None:
    q, k = _inputs(9, 13, 5, torch.float64)
    positives = torch.tensor([12, 0, 3, 3, 7, 1, 11, 5, 9])
    fn = lambda q, k: info_nce_tiled(q, k, 0.5, positives, normalize, block_q=4, block_k=5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_gradcheck_float64(normalize: bool) -> None:
    q, k = _inputs(6, 8, 4, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k: info_nce_reference(q, k, 0.5, None, normalize), (q, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_low_precision_computes_in_float32(dtype: torch.dtype) -> None:
    q, k = _inputs(40, 70, 16, dtype)
    expected = _loss_and_grads(info_nce_reference, q, k, 0.2)
    actual = _loss_and_grads(info_nce_tiled, q, k, 0.2, block_q=16, block_k=16)
    assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype and actual[2].dtype == dtype
    _assert_same(actual, expected, atol=1e-5, rtol=1e-2)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_materializes_the_logits() -> None:
    n, m, d, block = 300, 500, 8, 64
    q, k = _inputs(n, m, d)
    with _LargestTensor() as tiled:
        info_nce_tiled(q, k, 0.1, block_q=block, block_k=block).backward()
    with _LargestTensor() as reference:
        info_nce_reference(q, k, 0.1).backward()
    assert reference.largest >= n * m  # the probe sees the logits when they exist
    assert tiled.largest <= max(block * block, m * d)


def test_only_q_needs_grad_as_in_moco() -> None:
    """MoCo v3: keys from all ranks, no gradient to them, rank 1's positives start at N."""
    n, ranks = 16, 3
    q, k = _inputs(n, n * ranks, 32)
    positives = torch.arange(n) + 1 * n
    expected = torch.autograd.grad(info_nce_reference(q, k.detach(), 0.2, positives), q)[0]
    for impl in ("tiled", "triton"):
        q_copy = q.detach().clone().requires_grad_()
        keys = k.detach()
        info_nce(q_copy, keys, 0.2, positives, impl=impl).backward()
        assert keys.grad is None
        torch.testing.assert_close(q_copy.grad, expected, **FP32)


def test_auto_uses_tiled_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(
        infonce_module, "info_nce_tiled", lambda *a, **kw: calls.append(a) or info_nce_reference(*a, **kw)
    )
    q, k = _inputs(4, 4, 8)
    info_nce(q, k, 0.1)
    assert len(calls) == 1


# ------------------------------------------------------------------------------------- Triton (interpreted)


@pytest.mark.parametrize(
    ("n", "m", "d", "normalize", "explicit_positives"),
    [(33, 33, 16, True, False), (197, 197, 32, True, True), (64, 256, 128, False, True), (5, 40, 24, True, True)],
)
def test_triton_matches_reference_fp32(n: int, m: int, d: int, normalize: bool, explicit_positives: bool) -> None:
    q, k = _inputs(n, m, d, scale=0.3)
    positives = torch.randint(0, m, (n,), generator=torch.Generator().manual_seed(2)) if explicit_positives else None
    expected = _loss_and_grads(info_nce_reference, q, k, 0.07, positives, normalize)
    actual = _loss_and_grads(info_nce, q, k, 0.07, positives, normalize, impl="triton")
    _assert_same(actual, expected, **FP32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_low_precision(dtype: torch.dtype) -> None:
    """fp16 dots run as fp16 (as on a GPU); bf16 ones are upcast under the interpreter, whose bf16 tl.dot is wrong."""
    q, k = _inputs(48, 80, 32, dtype)
    expected = _loss_and_grads(info_nce_reference, q, k, 0.2)
    actual = _loss_and_grads(info_nce, q, k, 0.2, impl="triton")
    assert actual[0].dtype == torch.float32 and actual[1].dtype == dtype and actual[2].dtype == dtype
    _assert_same(actual, expected, atol=2e-3, rtol=2e-2)


def test_triton_non_contiguous_inputs() -> None:
    q, k = _inputs(32, 40, 48)
    q_t, k_t = q.detach().T.contiguous().T.requires_grad_(), k.detach()[:, :]
    assert not q_t.is_contiguous()
    expected = _loss_and_grads(info_nce_reference, q, k, 0.1)
    _assert_same(_loss_and_grads(info_nce, q_t, k_t, 0.1, impl="triton"), expected, **FP32)


def test_triton_interpreted_and_refuses_cpu_without_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels.infonce import triton_kernels

    assert triton_kernels.INTERPRETED
    monkeypatch.setattr(triton_kernels, "INTERPRETED", False)
    q, k = _inputs(4, 4, 16)
    with pytest.raises(RuntimeError, match=r"needs CUDA tensors .*TRITON_INTERPRET=1.*impl='tiled'"):
        info_nce(q, k, 0.1, impl="triton")


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("impl", ["reference", "tiled", "triton"])
@pytest.mark.parametrize(
    ("q_shape", "k_shape", "temperature", "positives", "message"),
    [
        ((4, 8), (6, 7), 0.1, None, r"expects q \[N, D\] and k \[M, D\], got \(4, 8\) and \(6, 7\)"),
        ((4, 8), (6, 8), 0.0, None, r"temperature must be > 0, got 0.0"),
        ((5, 8), (3, 8), 0.1, None, r"each query needs a key: N=5 > M=3"),
        ((4, 8), (6, 8), 0.1, torch.tensor([0, 1, 2]), r"positives must be \[N\]=4 indices"),
        ((4, 8), (6, 8), 0.1, torch.tensor([0, 1, 2, 6]), r"positives must index keys in \[0, 6\), got \[0, 6\]"),
        ((4, 8), (6, 8), 0.1, torch.tensor([0.0, 1, 2, 3]), r"positives must be integer key indices"),
    ],
)
def test_bad_input_is_rejected(impl, q_shape, k_shape, temperature, positives, message) -> None:  # noqa: ANN001
    q, k = torch.randn(q_shape), torch.randn(k_shape)
    with pytest.raises(ValueError, match=message):
        info_nce(q, k, temperature, positives, impl=impl)


def test_mismatched_dtypes_and_unknown_impl() -> None:
    with pytest.raises(ValueError, match=r"q and k differ: torch.float32 on cpu vs torch.float16 on cpu"):
        info_nce(torch.randn(4, 8), torch.randn(4, 8).half(), 0.1, impl="tiled")
    with pytest.raises(ValueError, match=r"unknown info_nce impl 'fast'; available: auto, reference, tiled, triton"):
        info_nce(torch.randn(4, 8), torch.randn(4, 8), 0.1, impl="fast")


def test_cross_entropy_semantics_without_normalization() -> None:
    """normalize=False is plain cross-entropy of q k^T / T (for callers that normalize themselves)."""
    q, k = _inputs(6, 9, 4, torch.float64)
    expected = F.cross_entropy(q @ k.T / 0.5, torch.arange(6))
    torch.testing.assert_close(info_nce(q, k, 0.5, normalize=False, impl="tiled"), expected, atol=1e-12, rtol=1e-12)
    triton_loss = info_nce(q.float(), k.float(), 0.5, normalize=False, impl="triton")
    torch.testing.assert_close(triton_loss, expected.float(), atol=1e-6, rtol=1e-6)


def test_triton_rejects_float64() -> None:
    with pytest.raises(ValueError, match=r"impl='triton' computes in float32 .* got torch.float64; use impl='tiled'"):
        info_nce(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), 0.1, impl="triton")


# ------------------------------------------------------------------------------------- NT-Xent (SimCLR)


def _nt_xent_inputs(rows: int, d: int, dtype=torch.float32, rank: int = 0, world: int = 1):
    """This rank's rows as queries against every rank's rows as keys (a stand-in for the gathered views)."""
    generator = torch.Generator().manual_seed(3)
    keys = torch.randn(rows * world, d, generator=generator).to(dtype).requires_grad_()
    queries = keys.detach()[rank * rows : (rank + 1) * rows].clone().requires_grad_()
    positives, exclude = infonce_module.nt_xent_indices(rows, rank, queries.device)
    return queries, keys, positives, exclude


def test_nt_xent_indices_pair_the_views_and_exclude_self() -> None:
    positives, exclude = infonce_module.nt_xent_indices(6, rank=1, device=torch.device("cpu"))
    assert exclude.tolist() == [6, 7, 8, 9, 10, 11]
    assert positives.tolist() == [9, 10, 11, 6, 7, 8]
    with pytest.raises(ValueError, match="even number of rows"):
        infonce_module.nt_xent_indices(5, 0, torch.device("cpu"))


def test_excluded_keys_leave_the_softmax() -> None:
    """Written out: the excluded key is absent from the log-sum-exp, so moving it changes nothing."""
    q, k, positives, exclude = _nt_xent_inputs(6, 4, torch.float64, rank=1, world=2)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = qn @ kn.T / 0.4
    expected = torch.stack(
        [
            torch.cat([logits[i, :e], logits[i, e + 1 :]]).logsumexp(0) - logits[i, p]
            for i, (p, e) in enumerate(zip(positives.tolist(), exclude.tolist()))
        ]  # fmt: skip
    ).mean()
    loss = info_nce_reference(q, k, 0.4, positives, exclude=exclude)
    torch.testing.assert_close(loss, expected, atol=1e-12, rtol=1e-12)
    moved = k.detach().clone()
    moved[exclude[0]] = 100.0
    first = q.detach()[:1], positives[:1]
    assert float(info_nce_reference(first[0], moved, 0.4, first[1], exclude=exclude[:1])) == pytest.approx(
        float(info_nce_reference(first[0], k.detach(), 0.4, first[1], exclude=exclude[:1])), rel=1e-12
    )


@pytest.mark.parametrize(("block_q", "block_k"), [(1024, 1024), (5, 3), (4, 1)])
@pytest.mark.parametrize("world", [1, 2])
def test_tiled_nt_xent_matches_reference(block_q: int, block_k: int, world: int) -> None:
    """block_k = 1 makes tiles whose only key is excluded: the online log-sum-exp must not turn NaN."""
    q, k, positives, exclude = _nt_xent_inputs(10, 8, rank=world - 1, world=world)
    expected = _loss_and_grads(info_nce_reference, q, k, 0.1, positives, exclude=exclude)
    actual = _loss_and_grads(info_nce_tiled, q, k, 0.1, positives, block_q=block_q, block_k=block_k, exclude=exclude)
    _assert_same(actual, expected, **FP32)


def test_tiled_nt_xent_gradcheck_float64() -> None:
    q, k, positives, exclude = _nt_xent_inputs(6, 5, torch.float64, rank=1, world=2)
    fn = lambda q, k: info_nce_tiled(q, k, 0.3, positives, block_q=4, block_k=3, exclude=exclude)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k))


@pytest.mark.parametrize(("rows", "d", "world"), [(10, 8, 1), (66, 24, 2), (34, 16, 3)])
def test_triton_nt_xent_matches_reference(rows: int, d: int, world: int) -> None:
    q, k, positives, exclude = _nt_xent_inputs(rows, d, rank=world - 1, world=world)
    expected = _loss_and_grads(info_nce_reference, q, k, 0.1, positives, exclude=exclude)
    actual = _loss_and_grads(info_nce, q, k, 0.1, positives, impl="triton", exclude=exclude)
    _assert_same(actual, expected, **FP32)


@pytest.mark.parametrize("impl", ["reference", "tiled", "triton"])
def test_an_excluded_positive_is_rejected(impl: str) -> None:
    q, k = _inputs(4, 4, 8)
    with pytest.raises(ValueError, match="excluded key is its positive"):
        info_nce(q, k, 0.1, torch.tensor([1, 2, 3, 0]), impl=impl, exclude=torch.tensor([0, 2, 0, 0]))
    with pytest.raises(ValueError, match="exclude must index keys"):
        info_nce(q, k, 0.1, impl=impl, exclude=torch.tensor([1, 2, 3, 9]))
