"""The triton attention backend (interpreted on the CPU) agrees with the reference; xformers is optional and says so.

Triton decides whether to interpret when it is imported, so tests/conftest.py sets TRITON_INTERPRET=1
before anything in the process imports triton (DeepSpeed imports it early); this module sets it too,
for runs without the conftest. If triton was already imported for the GPU, this module refuses to run rather than
testing the wrong thing.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("triton was imported before TRITON_INTERPRET=1 was set; run this test module on its own")
os.environ["TRITON_INTERPRET"] = "1"

import importlib.util  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import kernels.attention.triton_attention as triton_attention_module  # noqa: E402
from kernels.attention import (  # noqa: E402
    attention,
    available_backends,
    get_attention_backend,
    reference_attention,
    sdpa_attention,
    unavailable_reason,
)
from kernels.attention.xformers_attention import memory_efficient, xformers_attention  # noqa: E402
from pretrain.config import ConfigError  # noqa: E402
from pretrain.models.transformer import Attention  # noqa: E402
from pretrain.recipes import load_config  # noqa: E402

TOLERANCES = {
    torch.float32: dict(atol=1e-5, rtol=1e-4),
    torch.float16: dict(atol=2e-3, rtol=1e-2),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}


def _qkv_and_upstream(shape, dtype, seed=0):  # noqa: ANN001, ANN202
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=generator).to(dtype) for _ in range(4)]
    return [t.requires_grad_() for t in tensors[:3]], tensors[3]


def _output_and_grads(backend, q, k, v, upstream):  # noqa: ANN001, ANN202
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend)
    out.backward(upstream)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        ((1, 1, 197, 64), torch.float32),  # ViT-B/16 at 224 px: 196 patches + cls, not a multiple of the block
        ((1, 1, 257, 32), torch.float32),  # ViT /14: 256 + 1
        ((2, 3, 33, 16), torch.float32),
        ((1, 1, 40, 80), torch.float32),  # ViT-H/14's head dim, padded to 128 inside the kernel
        ((1, 2, 50, 128), torch.float16),
        ((1, 1, 197, 64), torch.float16),
        ((1, 2, 33, 32), torch.bfloat16),  # bf16 dots upcast under the interpreter
    ],
)
def test_triton_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    (q, k, v), upstream = _qkv_and_upstream(shape, dtype)
    expected = _output_and_grads("reference", q, k, v, upstream)
    actual = _output_and_grads("triton", q, k, v, upstream)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == dtype
        torch.testing.assert_close(a.float(), e.float(), **TOLERANCES[dtype])


def test_triton_backend_in_the_model_block(monkeypatch: pytest.MonkeyPatch) -> None:
    """q, k, v as the model makes them (strided views of one qkv projection) give the sdpa block's output and grads."""
    launches = []
    kernels_module = triton_attention_module.kernels_module
    monkeypatch.setattr(triton_attention_module, "kernels_module", lambda: launches.append(1) or kernels_module())
    torch.manual_seed(0)
    module = Attention(dim=64, num_heads=2, attn_backend="sdpa")
    x = torch.randn(2, 37, 64)
    results = {}
    for backend in ("sdpa", "triton"):
        module.attn_backend = backend
        module.zero_grad()
        x_copy = x.clone().requires_grad_()
        out = module(x_copy)
        out.square().mean().backward()
        results[backend] = (out.detach(), x_copy.grad, module.qkv.weight.grad.clone())
    assert len(launches) >= 2  # forward and backward ran the kernels
    for a, e in zip(results["triton"], results["sdpa"]):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_triton_on_cpu_without_interpreter_uses_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(triton_attention_module, "kernels_module", lambda: pytest.fail("kernel launched on CPU"))
    (q, k, v), _ = _qkv_and_upstream((1, 2, 9, 16), torch.float32)
    torch.testing.assert_close(attention(q, k, v, backend="triton"), sdpa_attention(q, k, v), atol=0, rtol=0)


def test_triton_rejects_unsupported_input() -> None:
    (q, k, v), _ = _qkv_and_upstream((1, 1, 8, 16), torch.float64)
    with pytest.raises(ValueError, match="supports float32, float16 and bfloat16 alike, got torch.float64"):
        attention(q, k, v, backend="triton")
    (q, k, v), _ = _qkv_and_upstream((1, 1, 8, 16), torch.float32)
    with pytest.raises(ValueError, match=r"one shape \[B, H, N, D\]"):
        attention(q, k[:, :, :5], v, backend="triton")


# ------------------------------------------------------------------------------------- optional packages


def _without(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == package else real_find_spec(name, *a)
    )


@pytest.mark.parametrize(
    ("backend", "install"), [("xformers", "pip install xformers"), ("triton", "pip install triton")]
)
def test_missing_package_fails_before_work_and_names_it(monkeypatch: pytest.MonkeyPatch, backend, install) -> None:  # noqa: ANN001
    _without(monkeypatch, backend)
    assert backend not in available_backends()
    assert install in unavailable_reason(backend)
    with pytest.raises(ValueError, match=f"needs the {backend} package, which is not installed: {install}"):
        get_attention_backend(backend)
    with pytest.raises(ValueError, match=install):
        Attention(dim=32, num_heads=2, attn_backend=backend)
    with pytest.raises(ConfigError, match=f"model.attn_backend: attention backend '{backend}' needs .*{install}"):
        load_config(None, [f"model.attn_backend={backend}"])


def test_installed_backends_are_available() -> None:
    assert ("triton" in available_backends()) == (importlib.util.find_spec("triton") is not None)
    assert ("xformers" in available_backends()) == (importlib.util.find_spec("xformers") is not None)
    assert unavailable_reason("sdpa") is None and unavailable_reason("no-such-backend") is None


def _fake_xformers(monkeypatch: pytest.MonkeyPatch, calls: list) -> None:
    """xformers.ops.memory_efficient_attention's contract: [B, N, H, D] in and out."""

    def memory_efficient_attention(q, k, v):  # noqa: ANN001, ANN202
        calls.append(q.shape)
        return reference_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    package = types.ModuleType("xformers")
    package.ops = types.SimpleNamespace(memory_efficient_attention=memory_efficient_attention)
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", package.ops)


def test_xformers_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_xformers(monkeypatch, calls)
    (q, k, v), _ = _qkv_and_upstream((2, 3, 11, 8), torch.float32)
    out = memory_efficient(q, k, v)
    assert calls == [(2, 11, 3, 8)]
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=0, rtol=0)


def test_xformers_on_cpu_uses_pytorch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    _fake_xformers(monkeypatch, calls)
    (q, k, v), _ = _qkv_and_upstream((1, 2, 9, 16), torch.float32)
    torch.testing.assert_close(xformers_attention(q, k, v), sdpa_attention(q, k, v), atol=0, rtol=0)
    assert calls == []
