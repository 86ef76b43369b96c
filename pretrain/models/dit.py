"""Diffusion Transformer (Peebles & Xie, 2023): a ViT over latent (or pixel) patches whose blocks are
conditioned on timestep and class through adaLN-Zero.

adaLN-Zero: each block regresses shift/scale/gate vectors from the conditioning embedding, and the
regressor starts at zero, so a fresh block is the identity and a fresh DiT outputs zero. The class
embedding table has one extra row, the "null" class, which training substitutes for the label with
probability `class_dropout` so that one network also gives the unconditional prediction that
classifier-free guidance needs.

With `guidance_embed` the DiT also takes a per-sample guidance scale s (paper convention, s = 1: no
guidance) whose embedding is added to the conditioning, as in guidance distillation (Meng et al., 2023)
and FLUX-dev: one forward then stands in for the teacher's two guided ones.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from pretrain.models.class_dropout import drop_labels
from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.transformer import Attention, Mlp

# size name -> (hidden_dim, depth, num_heads), as in the DiT paper's Table 1
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features [N, dim] of timesteps t in [0, 1], scaled by 1000 so the frequencies span
    the same range as for DiT's integer diffusion steps."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (1000.0 * t.float())[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t -> sinusoidal features -> 2-layer MLP."""

    def __init__(self, hidden_dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """Per-sample affine of normalized tokens [B, N, D] by [B, D] shift and scale (scale around 1)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorms are modulated, and whose residual branches are gated,
    by vectors regressed from the conditioning. The unit the engine wraps."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=True, attn_backend=attn_backend)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to its patch of output values."""

    def __init__(self, dim: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Velocity (or noise) predictor [B, C, H, W] from noisy input, timestep t in [0, 1] and class label.

    Labels equal to `num_classes` (the `null_class`) select the unconditional embedding. In training
    mode, labels are replaced by the null class with probability `class_dropout` (drawn from the
    global RNG, which the train loop seeds per micro-batch).
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_dim: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout: float = 0.1,
        attn_backend: str = "sdpa",
        guidance_embed: bool = False,
    ) -> None:
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.num_classes, self.class_dropout = num_classes, class_dropout
        self.grid_size = input_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_dim)
        self.y_embedder = nn.Embedding(num_classes + 1, hidden_dim)  # last row: the null class
        # Only created when on, so that checkpoints of guidance-free DiTs keep their exact keys.
        self.guidance_embed = guidance_embed
        self.g_embedder = TimestepEmbedder(hidden_dim) if guidance_embed else None
        self.register_buffer("pos_embed", torch.empty(1, self.grid_size**2, hidden_dim), persistent=False)
        self.blocks = nn.ModuleList(DiTBlock(hidden_dim, num_heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_dim, patch_size, in_channels)
        self.init_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @torch.no_grad()
    def init_weights(self) -> None:
        """DiT's init: Xavier linears, N(0, 0.02) embeddings, and zero adaLN regressors and output layer.

        The guidance embedder's first layer is drawn like the timestep embedder's, but its output layer
        starts at zero: a guidance student loaded from a teacher checkpoint (which has no g_embedder)
        then starts as exactly the teacher's conditional model, for every s.
        """
        self.pos_embed.copy_(sincos_pos_embed_2d(self.grid_size, self.grid_size, self.pos_embed.shape[-1])[None])
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        conv = self.x_embedder
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        for linear in self.t_embedder.mlp[0], self.t_embedder.mlp[2]:
            nn.init.normal_(linear.weight, std=0.02)
        if self.g_embedder is not None:
            nn.init.normal_(self.g_embedder.mlp[0].weight, std=0.02)
            nn.init.zeros_(self.g_embedder.mlp[2].weight)  # biases: zeroed with every Linear above
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for linear in self.final_layer.adaLN_modulation[-1], self.final_layer.linear:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def published_parameter_count(self) -> int:
        """Parameters as the DiT paper counts them: every parameter, plus the fixed position table (a buffer
        here, a frozen parameter in the released code) and the variance outputs of its learned-sigma final
        layer, which rectified flow does not need (DiT-XL/2: 675,129,632)."""
        hidden = self.pos_embed.shape[-1]
        variance = (hidden + 1) * self.patch_size**2 * self.in_channels
        return sum(p.numel() for p in self.parameters()) + self.pos_embed.numel() + variance

    def drop_labels(self, labels: Tensor) -> Tensor:
        """Replace each label by the null class with probability `class_dropout` (the global RNG)."""
        return drop_labels(labels, self.class_dropout, self.null_class)

    def unpatchify(self, tokens: Tensor) -> Tensor:
        """[B, L, p*p*C] -> [B, C, H, W], the inverse of the strided patch embedding's layout."""
        batch, p, c, g = tokens.shape[0], self.patch_size, self.in_channels, self.grid_size
        x = tokens.reshape(batch, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(batch, c, g * p, g * p)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, guidance: Tensor | float | None = None) -> Tensor:
        """`guidance`: the scale s per sample ([B], or one number for all), required exactly when the DiT
        was built with `guidance_embed`; s itself is embedded, with the timestep's sinusoid and its own MLP."""
        if self.g_embedder is None and guidance is not None:
            raise ValueError("this DiT has no guidance input (build it with guidance_embed=True)")
        if self.g_embedder is not None and guidance is None:
            raise ValueError("this DiT was built with guidance_embed=True: pass guidance, the scale s per sample")
        if self.training:
            labels = self.drop_labels(labels)
        tokens = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed.to(x.dtype)
        c = self.t_embedder(t) + self.y_embedder(labels)
        if self.g_embedder is not None:
            c = c + self.g_embedder(torch.as_tensor(guidance, device=x.device).expand(x.shape[0]))
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.unpatchify(self.final_layer(tokens, c))


def build_dit(
    size: str,
    *,
    hidden_dim: int = 0,
    depth: int = 0,
    num_heads: int = 0,
    guidance_embed: bool = False,
    **kwargs,
) -> DiT:
    """A DiT of a paper size ("S", "B", "L", "XL"); nonzero hidden_dim/depth/num_heads override it
    (small models for CPU demos and tests); `guidance_embed` adds the guidance-scale input (guidance
    distillation's student). `kwargs` go to DiT."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; available: {', '.join(DIT_SIZES)}")
    dim0, depth0, heads0 = DIT_SIZES[size]
    return DiT(
        hidden_dim=hidden_dim or dim0,
        depth=depth or depth0,
        num_heads=num_heads or heads0,
        guidance_embed=guidance_embed,
        **kwargs,
    )
