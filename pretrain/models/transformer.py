"""Pre-norm transformer pieces shared by the ViT encoder, the MAE decoder and DiT.

Submodule names (attn.qkv, attn.proj, mlp.fc1, mlp.fc2, norm1, norm2) follow timm and the MAE
reference so their checkpoints map onto these modules by name.
"""

import torch
from torch import Tensor, nn

from kernels.attention import attention, get_attention_backend


class Attention(nn.Module):
    """Multi-head self-attention; the kernel is picked by name so configs can swap it after construction."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_backend: str = "sdpa") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        get_attention_backend(attn_backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_backend = attn_backend
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = attention(q, k, v, backend=self.attn_backend)
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


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)). The unit the engine wraps.

    `drop_path` > 0 drops each residual branch per sample (fine-tuning's stochastic depth); the blocks then
    draw random numbers, which activation checkpointing must replay (engines/parallelize.py)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn_backend: str = "sdpa",
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))

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
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


@torch.no_grad()
def init_trunc_normal_and_norm(module: nn.Module) -> None:
    """Truncated-normal (std 0.02) Linear weights, zero biases, unit LayerNorms: the DINO ViT init."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
