"""Vision Transformer encoder, built so MAE can encode visible patches only.

Parameter names follow timm (patch_embed.proj, cls_token, pos_embed, blocks.N..., norm, head), so
published ViT/MAE/DINO/MoCo v3 weights load by name. The conventions in which the released codes differ
are options, so each recipe can follow its paper:

- positions (`pos_embed`): "sincos", a fixed table (a non-persistent buffer, recomputed by
  `init_weights`, never checkpointed) with the column in the first half of the channels (MAE) or the row
  (`sincos_row_first`, MoCo v3); "learned", a trained N x D table; "learned_cls", a trained (N + 1) x D
  table whose first row is added to the cls token (DINO).
- resampling the table for a smaller input (`pos_interpolation`): "size", bicubic to the new grid g;
  "scale_offset", bicubic with scale factor (g + 0.1) / G, i.e. table positions G / (g + 0.1) apart
  (the DINO reference: the 0.1 avoids a floating-point error in the output size).
- init (`init`): "xavier" (MAE: Xavier-uniform linears, fused qkv as one matrix, cls N(0, 0.02));
  "xavier_split_qkv" (MoCo v3: q, k and v each Xavier-uniform, i.e. the fan of a third of the fused
  qkv, cls N(0, 1e-6)); "trunc_normal" (DINO: linears, cls and learned positions truncated-normal with
  std 0.02, the patch conv at PyTorch's default).

DINOv2's parts are options too: LayerScale (`layer_scale`), a SwiGLU feed-forward (`ffn`), register
tokens (`num_register_tokens`, Darcet et al. 2024: extra learned tokens after the cls token, without
positions, that no patch output includes), a mask token for iBOT (`mask_token`), stochastic depth
uniform over the blocks or DINOv2's subset form (`drop_path_uniform`, `drop_path_mode`), and the size
"giant2" (1536 wide, 40 blocks, 24 heads: DINOv2's ViT-g/14, not the 1408-wide ViT-g of Zhai et al.).
"""

import math
from typing import Any, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.config import FeaturePool, PosEmbed, PosInterpolation, ViTInit
from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.transformer import (
    FFN,
    Block,
    DropPathMode,
    init_linear_and_norm,
    init_trunc_normal_and_norm,
)

POOLS: tuple[str, ...] = get_args(FeaturePool)
POS_EMBEDS: tuple[str, ...] = get_args(PosEmbed)
POS_INTERPOLATIONS: tuple[str, ...] = get_args(PosInterpolation)
VIT_INITS: tuple[str, ...] = get_args(ViTInit)

# size name -> (embed_dim, depth, num_heads)
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
    "giant2": (1536, 40, 24),  # DINOv2's ViT-g/14 (vit_giant2 in its code), with ffn="swiglu"
}


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """[B, C, H, W] -> [B, L, p*p*C], patches row-major, pixels inside a patch ordered (row, col, channel) as in MAE."""
    batch, channels, height, width = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"image size {height}x{width} is not divisible by patch size {patch_size}")
    grid_h, grid_w = height // patch_size, width // patch_size
    x = images.reshape(batch, channels, grid_h, patch_size, grid_w, patch_size)
    x = x.permute(0, 2, 4, 3, 5, 1)
    return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: Tensor, patch_size: int, channels: int) -> Tensor:
    """Inverse of `patchify` for a square grid: [B, L, p*p*C] -> [B, C, H, W]."""
    batch, num_patches, _ = patches.shape
    grid = math.isqrt(num_patches)
    if grid * grid != num_patches:
        raise ValueError(f"{num_patches} patches do not form a square grid")
    x = patches.reshape(batch, grid, grid, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)
    return x.reshape(batch, channels, grid * patch_size, grid * patch_size)


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of parameter entries (buffers such as fixed position embeddings are not parameters)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens via a strided conv (a Linear applied to each flattened patch)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size, self.patch_size = img_size, patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: Tensor) -> Tensor:
        """Any size divisible by the patch (DINO's local crops are smaller than the global ones)."""
        height, width = images.shape[-2:]
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not divisible by the patch size {self.patch_size}")
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """ViT: patch tokens + fixed 2-D sin-cos positions, a cls token, pre-norm blocks, final norm, optional head."""

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        qkv_bias: bool = True,
        attn_backend: str = "sdpa",
        pool: str = "cls",
        pos_embed: str = "sincos",
        sincos_row_first: bool = False,
        pos_interpolation: str = "size",
        init: str = "xavier",
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        drop_path_mode: DropPathMode = "per_sample",
        layer_scale: float = 0.0,
        ffn: FFN = "mlp",
        num_register_tokens: int = 0,
        mask_token: bool = False,
    ) -> None:
        super().__init__()
        for name, value, options in (
            ("pool", pool, POOLS),
            ("pos_embed", pos_embed, POS_EMBEDS),
            ("pos_interpolation", pos_interpolation, POS_INTERPOLATIONS),
            ("init", init, VIT_INITS),
        ):
            if value not in options:
                raise ValueError(f"unknown {name} {value!r}; expected one of {options}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.pool = pool
        self.pos_embed_kind, self.sincos_row_first = pos_embed, sincos_row_first
        self.pos_interpolation, self.init = pos_interpolation, init
        # Rows of the table before the patches': 1 when the cls token has a position of its own.
        self.num_prefix_positions = 1 if pos_embed == "learned_cls" else 0
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.num_register_tokens = num_register_tokens
        # Tokens before the patches' in every output: cls, then the registers.
        self.num_prefix_tokens = 1 + num_register_tokens

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        table = torch.empty(1, self.num_prefix_positions + self.num_patches, embed_dim)
        if pos_embed == "sincos":
            self.register_buffer("pos_embed", table, persistent=False)
        else:
            self.pos_embed = nn.Parameter(table)
        self.register_tokens = (
            nn.Parameter(torch.empty(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        # iBOT's masked patches: the patch embedding replaced by this learned token (DINOv2's [1, D]).
        self.mask_token = nn.Parameter(torch.empty(1, embed_dim)) if mask_token else None
        # Stochastic depth rising linearly from 0 at the first block to drop_path_rate at the last (timm,
        # MAE, DINOv2's default), or drop_path_rate at every block (DINOv2's ViT-g recipe).
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias=qkv_bias,
                attn_backend=attn_backend,
                drop_path=rate,
                layer_scale=layer_scale,
                ffn=ffn,
                drop_path_mode=drop_path_mode,
            )
            for rate in rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialize parameters and the position buffer, e.g. after building on the meta device and `to_empty`."""
        conv = self.patch_embed.proj
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)  # DINOv2
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)  # DINOv2
        if self.pos_embed_kind == "sincos":
            table = sincos_pos_embed_2d(self.grid_size, self.grid_size, self.embed_dim, row_first=self.sincos_row_first)
            self.pos_embed.copy_(table.unsqueeze(0))
        if self.init == "trunc_normal":
            self.apply(init_trunc_normal_and_norm)
            conv.reset_parameters()  # the DINO reference leaves the patch conv at PyTorch's default
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            if self.pos_embed_kind != "sincos":
                nn.init.trunc_normal_(self.pos_embed, std=0.02)
            return
        self.apply(init_linear_and_norm)
        # The conv is a Linear over flattened patches: give it the same init as one.
        nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
        nn.init.zeros_(conv.bias)
        if self.pos_embed_kind != "sincos":
            nn.init.normal_(self.pos_embed, std=0.02)
        if self.init == "xavier_split_qkv":
            for block in self.blocks:
                qkv = block.attn.qkv.weight  # [3D, D]: Xavier-uniform of each [D, D] third
                bound = math.sqrt(6.0 / (qkv.shape[0] // 3 + qkv.shape[1]))
                nn.init.uniform_(qkv, -bound, bound)
            nn.init.normal_(self.cls_token, std=1e-6)
        else:
            nn.init.normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """The learned tokens (timm's and MAE's rule for the cls token, extended to the registers and the mask token)."""
        names = {"cls_token"}
        if self.register_tokens is not None:
            names.add("register_tokens")
        if self.mask_token is not None:
            names.add("mask_token")
        return names

    def embed(self, images: Tensor, keep_indices: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
        """The blocks' input [B, P + K, D]: cls, registers (P prefix tokens), then the patches.

        `masks` [B, L] (True = masked) replaces those patches' embeddings by the mask token before positions are
        added (iBOT). `keep_indices` [B, K] selects which patches enter the encoder (MAE's visible set);
        positions are added before the selection so every kept token carries its original location."""
        tokens = self.patch_embed(images)
        if masks is not None:
            if self.mask_token is None:
                raise ValueError("masks given to a ViT built without a mask token (mask_token=True)")
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = tokens + self.position_embedding(*images.shape[-2:])
        if keep_indices is not None:
            tokens = tokens.gather(1, keep_indices.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        prefix = [self.cls_with_position().expand(tokens.shape[0], -1, -1)]
        if self.register_tokens is not None:
            prefix.append(self.register_tokens.expand(tokens.shape[0], -1, -1))
        return torch.cat([*prefix, tokens], dim=1)

    def forward_tokens(self, images: Tensor, keep_indices: Tensor | None = None, masks: Tensor | None = None) -> Tensor:
        """Normalized tokens [B, P + K, D]: cls first, then the registers, then the patches (see `embed`)."""
        x = self.embed(images, keep_indices, masks)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """The patches' part [B, K, D] of `forward_tokens`' output: no cls, no registers."""
        return tokens[:, self.num_prefix_tokens :]

    def cls_with_position(self) -> Tensor:
        """[1, 1, D]: the cls token, plus its own position when the table has one."""
        if self.num_prefix_positions:
            return self.cls_token + self.pos_embed[:, :1]
        return self.cls_token

    def position_embedding(self, height: int, width: int) -> Tensor:
        """[1, L, D] patch positions for a height x width input: the table itself at the training size, else
        the table resampled bicubically, so a smaller crop sees the same span of positions as the full image."""
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        patches = self.pos_embed[:, self.num_prefix_positions :] if self.num_prefix_positions else self.pos_embed
        if (grid_h, grid_w) == (self.grid_size, self.grid_size):
            return patches
        table = patches.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        if self.pos_interpolation == "scale_offset":
            scale = ((grid_h + 0.1) / self.grid_size, (grid_w + 0.1) / self.grid_size)
            table = F.interpolate(table, scale_factor=scale, mode="bicubic", align_corners=False)
            if table.shape[-2:] != (grid_h, grid_w):
                raise ValueError(f"position table resampled to {tuple(table.shape[-2:])}, expected {(grid_h, grid_w)}")
        else:
            table = F.interpolate(table, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return table.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)

    @torch.no_grad()
    def last_attention(self, images: Tensor) -> Tensor:
        """The last block's attention from the cls token to every patch, [B, heads, grid_h, grid_w]."""
        x = self.embed(images)
        for block in self.blocks[:-1]:
            x = block(x)
        last = self.blocks[-1]
        weights = last.attn.attention_weights(last.norm1(x))[:, :, 0, self.num_prefix_tokens :]
        return weights.reshape(*weights.shape[:2], images.shape[-2] // self.patch_size, -1)

    def forward_features(self, images: Tensor, pool: str | None = None) -> Tensor:
        """Pooled features [B, D] for evaluation: the cls token, or the mean of the patch tokens."""
        pool = pool or self.pool
        tokens = self.forward_tokens(images)
        if pool == "cls":
            return tokens[:, 0]
        if pool == "mean":
            return self.patch_tokens(tokens).mean(dim=1)
        raise ValueError(f"unknown pool {pool!r}; expected one of {POOLS}")

    def published_parameter_count(self, num_classes: int = 1000) -> int:
        """Parameters as the ViT, MAE, MoCo v3 and DINO papers count them: every parameter, frozen or not,
        plus a fixed position table of (N + 1) x D (the released codes store it as a frozen parameter,
        cls row included), plus the `num_classes`-way classifier the ViT paper's counts include when this
        network has none (ViT-B/16: 86,567,656)."""
        count = sum(p.numel() for p in self.parameters())
        if self.pos_embed_kind == "sincos":
            count += (self.num_patches + 1) * self.embed_dim
        if isinstance(self.head, nn.Identity):
            count += self.embed_dim * num_classes + num_classes
        return count

    def forward(self, images: Tensor) -> Tensor:
        """Class logits when built with a head, pooled features otherwise."""
        return self.head(self.forward_features(images))


def build_vit(
    size: str, img_size: int = 224, patch_size: int = 16, num_heads: int = 0, **kwargs: Any
) -> VisionTransformer:
    """A ViT of a standard size ("tiny" ... "huge"); `num_heads` > 0 overrides the size's (the MoCo v3
    paper's ViT-S has 12 heads of 32 channels, DeiT's and DINO's 6 of 64); `kwargs` go to VisionTransformer."""
    if size not in VIT_SIZES:
        raise ValueError(f"unknown ViT size {size!r}; available: {', '.join(VIT_SIZES)}")
    embed_dim, depth, size_heads = VIT_SIZES[size]
    num_heads = num_heads or size_heads
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs
    )
