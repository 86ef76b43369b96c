"""The readable definition of attention, and PyTorch's fused SDPA: the two backends that run everywhere."""

import torch
import torch.nn.functional as F
from torch import Tensor


def reference_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D)) v, with the math in at least float32 so low-precision inputs get an exact answer."""
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    q32, k32, v32 = q.to(math_dtype), k.to(math_dtype), v.to(math_dtype)
    scores = (q32 @ k32.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v32).to(q.dtype)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """PyTorch's fused kernels (flash / memory-efficient / math, chosen by PyTorch per device and dtype)."""
    return F.scaled_dot_product_attention(q, k, v)
