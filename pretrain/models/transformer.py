"""Pre-norm transformer pieces shared by the ViT encoder, the MAE decoder and DiT.

Submodule names (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2) follow timm and the MAE
reference, and the DINOv2 parts (ls1.gamma, ls2.gamma, mlp.w12, mlp.w3) the DINOv2 release, so their
checkpoints map onto these modules by name.
"""

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.attention import attention, get_attention_backend


class Attention(nn.Module):
    """Multi-head self-attention; the kernel is picked by name so configs can swap it after construction.
    `causal`: position i attends to positions <= i (an autoregressive model's)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, attn_backend: str = "sdpa", causal: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        get_attention_backend(attn_backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cache=None) -> Tensor:
        """`cache`: a causal model's KV cache (pretrain/models/gpt.py: KVCache); the new positions attend over
        everything it holds, the kernel aligning the causal mask to the last queries."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.append(k, v)
        out = attention(q, k, v, backend=self.attn_backend, causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def attention_weights(self, x: Tensor) -> Tensor:
        """softmax(q k^T / sqrt(d)) [B, H, N, N], for pictures (the kernels never materialize it)."""
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, _ = qkv.float().unbind(0)
        return (q @ k.transpose(-2, -1) * self.head_dim**-0.5).softmax(dim=-1)


class Mlp(nn.Module):
    """Two-layer feed-forward network."""

    def __init__(self, dim: int, hidden: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = act()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """Gated feed-forward network (Shazeer 2020) as DINOv2's ViT-g/14 has it (SwiGLUFFNFused): one fused
    linear to 2 x hidden, silu(a) * b, a linear back. `hidden` comes from `swiglu_hidden`."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


def swiglu_hidden(dim: int, mlp_ratio: float) -> int:
    """DINOv2's width for a SwiGLU replacing an MLP of ratio `mlp_ratio`: two thirds of it (the same
    parameter count with three matrices instead of two), rounded up to a multiple of 8. 4096 for ViT-g/14."""
    return (int(int(dim * mlp_ratio) * 2 / 3) + 7) // 8 * 8


class LayerScale(nn.Module):
    """Per-channel scale of a residual branch, started small (Touvron et al. 2021, CaiT): deep ViTs (DINOv2:
    1e-5) begin near the identity. Named `gamma` as in DINOv2, so its checkpoints map by name."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.full((dim,), init_values))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.gamma.fill_(self.init_values)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma

    def extra_repr(self) -> str:
        return f"init_values={self.init_values:g}"


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016) per sample: a residual branch is dropped for a whole sample with
    probability `p` and kept ones are scaled by 1 / (1 - p), so the expectation equals the branch (timm's
    DropPath with scale_by_keep). Draws from the global RNG of the branch's device; identity in eval."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


def add_residual_on_a_subset(x: Tensor, branch: Callable[[Tensor], Tensor], drop: float) -> Tensor:
    """DINOv2's efficient stochastic depth: the branch runs on max(1, int(B (1 - drop))) samples drawn
    without replacement (the others skip it) and its output is added to them scaled by B / that count, so
    the dropped samples cost no compute. Draws from the global RNG of x's device."""
    batch = x.shape[0]
    kept = max(1, int(batch * (1 - drop)))
    index = torch.randperm(batch, device=x.device)[:kept]
    residual = branch(x[index]).to(x.dtype)
    return torch.index_add(x.flatten(1), 0, index, residual.flatten(1), alpha=batch / kept).view_as(x)


FFN = Literal["mlp", "swiglu"]
DropPathMode = Literal["per_sample", "subset"]


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The unit the engine wraps.

    `drop_path` > 0 drops residual branches (stochastic depth); the blocks then draw random numbers, which
    activation checkpointing must replay (engines/parallelize.py). `drop_path_mode`: per_sample (timm: the
    branch runs on the whole batch and is zeroed per sample) | subset (DINOv2: a block whose rate exceeds
    0.1 runs its branches on a random subset of the batch, `add_residual_on_a_subset`; lower rates per
    sample, as the released code does). `layer_scale` > 0 scales each branch by a LayerScale started there;
    `ffn`: mlp | swiglu (DINOv2's ViT-g)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_backend: str = "sdpa",
        drop_path: float = 0.0,
        layer_scale: float = 0.0,
        ffn: FFN = "mlp",
        drop_path_mode: DropPathMode = "per_sample",
    ) -> None:
        super().__init__()
        if ffn not in ("mlp", "swiglu"):
            raise ValueError(f"unknown ffn {ffn!r}; expected 'mlp' or 'swiglu'")
        if drop_path_mode not in ("per_sample", "subset"):
            raise ValueError(f"unknown drop_path_mode {drop_path_mode!r}; expected 'per_sample' or 'subset'")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_backend=attn_backend)
        self.ls1 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = SwiGLU(dim, swiglu_hidden(dim, mlp_ratio)) if ffn == "swiglu" else Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale) if layer_scale > 0 else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.subset_drop = drop_path if drop_path_mode == "subset" and drop_path > 0.1 else 0.0

    def attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.subset_drop:
            x = add_residual_on_a_subset(x, self.attn_branch, self.subset_drop)
            return add_residual_on_a_subset(x, self.mlp_branch, self.subset_drop)
        x = x + self.drop_path(self.attn_branch(x))
        return x + self.drop_path(self.mlp_branch(x))

    @property
    def uses_randomness(self) -> bool:
        return isinstance(self.drop_path, DropPath)


def set_attention_backend(module: nn.Module, name: str) -> None:
    """Point every Attention inside `module` at the named kernel."""
    get_attention_backend(name)
    for sub in module.modules():
        if isinstance(sub, Attention):
            sub.attn_backend = name


@torch.no_grad()
def init_linear_and_norm(module: nn.Module) -> None:
    """Xavier-uniform Linear weights, zero biases, unit LayerNorms: the MAE ViT init. Use with `Module.apply`."""
    if isinstance(module, LayerScale):
        module.reset_parameters()
    elif isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def init_trunc_normal_and_norm(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms: the DINO and DINOv2 ViT init."""
    if isinstance(module, LayerScale):
        module.reset_parameters()
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
