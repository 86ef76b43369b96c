"""The xformers backend: xformers.ops.memory_efficient_attention, which wants [B, N, H, D] instead of [B, H, N, D]."""

from torch import Tensor

from kernels.attention.reference import sdpa_attention


def xformers_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """xformers on CUDA tensors; SDPA on CPU tensors, where xformers has no kernels."""
    if q.device.type != "cuda":
        return sdpa_attention(q, k, v)
    return memory_efficient(q, k, v)


def memory_efficient(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    from xformers.ops import memory_efficient_attention

    out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)
