"""The xformers backend: xformers.ops.memory_efficient_attention, which wants [B, N, H, D] instead of [B, H, N, D].

Causal attention passes xformers' LowerTriangularMask, which is aligned to the top left when Nq != Nk,
so causal is accepted only with Nq == Nk (on every device, so a CPU run rejects what a GPU run would).
"""

from torch import Tensor

from kernels.attention.reference import sdpa_attention


def xformers_attention(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    """xformers on CUDA tensors; SDPA on CPU tensors, where xformers has no kernels."""
    if causal and q.shape[-2] != k.shape[-2]:
        raise ValueError(
            f"the xformers attention backend takes causal=True only with as many queries as keys, got "
            f"Nq={q.shape[-2]}, Nk={k.shape[-2]}; use the sdpa, reference or triton backend for a KV cache"
        )
    if q.device.type != "cuda":
        return sdpa_attention(q, k, v, causal=causal)
    return memory_efficient(q, k, v, causal=causal)


def memory_efficient(q: Tensor, k: Tensor, v: Tensor, causal: bool = False) -> Tensor:
    from xformers.ops import memory_efficient_attention

    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if causal:
        from xformers.ops import LowerTriangularMask

        out = memory_efficient_attention(q, k, v, attn_bias=LowerTriangularMask())
    else:
        out = memory_efficient_attention(q, k, v)
    return out.transpose(1, 2)
