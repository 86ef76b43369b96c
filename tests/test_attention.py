"""The attention backends agree with the float32 reference definition, in values and gradients."""

import pytest
import torch

from kernels.attention import (
    ATTENTION_BACKENDS,
    attention,
    available_backends,
    reference_attention,
)

TOLERANCES = {torch.float32: dict(atol=2e-6, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def _qkv(shape: tuple[int, ...], dtype: torch.dtype, requires_grad: bool = False) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=generator, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]


def test_backend_names() -> None:
    assert ATTENTION_BACKENDS == ("sdpa", "reference", "triton", "xformers")
    assert available_backends()[:2] == ("sdpa", "reference")
    assert set(available_backends()) <= set(ATTENTION_BACKENDS)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 197, 64), (3, 2, 50, 32), (1, 4, 7, 16)])
def test_sdpa_matches_reference(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    q, k, v = _qkv(shape, dtype)
    expected = attention(q, k, v, backend="reference")
    actual = attention(q, k, v, backend="sdpa")
    assert actual.shape == shape and actual.dtype == dtype
    torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def test_reference_is_softmax_attention_in_float32_for_low_precision() -> None:
    q, k, v = _qkv((2, 2, 9, 8), torch.bfloat16)
    q32, k32, v32 = q.float(), k.float(), v.float()
    weights = torch.softmax(q32 @ k32.transpose(-2, -1) / 8**0.5, dim=-1)
    out = reference_attention(q, k, v)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (weights @ v32).to(torch.bfloat16), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_match_reference(dtype: torch.dtype) -> None:
    upstream = torch.randn((2, 3, 50, 32), generator=torch.Generator().manual_seed(1), dtype=dtype)
    grads = {}
    for backend in ("sdpa", "reference"):
        q, k, v = _qkv((2, 3, 50, 32), dtype, requires_grad=True)
        (attention(q, k, v, backend=backend) * upstream).sum().backward()
        grads[backend] = (q.grad, k.grad, v.grad)
    for actual, expected in zip(grads["sdpa"], grads["reference"]):
        torch.testing.assert_close(actual, expected, **TOLERANCES[dtype])


def test_unknown_backend_names_the_available_ones() -> None:
    q, k, v = _qkv((1, 1, 4, 8), torch.float32)
    with pytest.raises(ValueError, match=r"unknown attention backend 'flash3'; available: sdpa, reference\b"):
        attention(q, k, v, backend="flash3")
