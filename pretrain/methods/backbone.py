"""The ViT backbone of the `model.*` section, shared by the methods that pretrain a ViT encoder."""

from __future__ import annotations

from pretrain.config import Config, ConfigError, check_choice
from pretrain.flops import FlopCount, vit_flops
from pretrain.models.vit import VIT_SIZES, VisionTransformer, build_vit


def build_vit_backbone(cfg: Config) -> VisionTransformer:
    model = cfg.model
    return build_vit(
        model.size,
        img_size=cfg.data.image_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        attn_backend=model.attn_backend,
        num_heads=model.num_heads,
        pos_embed=model.pos_embed,
        sincos_row_first=model.sincos_order == "row_first",
        pos_interpolation=model.pos_interpolation,
        init=model.init,
    )


def validate_vit_backbone(cfg: Config) -> None:
    check_choice("model.size", cfg.model.size, VIT_SIZES)
    if cfg.data.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} is not a multiple of model.patch_size {cfg.model.patch_size}"
        )
    width = VIT_SIZES[cfg.model.size][0]
    if cfg.model.num_heads and width % cfg.model.num_heads:
        raise ConfigError(
            f"model.num_heads: {cfg.model.num_heads} does not divide the width {width} of {cfg.model.size}"
        )
    if cfg.model.pos_embed == "sincos" and width % 4:
        raise ConfigError(f"model.pos_embed: a 2-D sin-cos table needs a width divisible by 4, got {width}")


def vit_width(cfg: Config) -> int:
    return VIT_SIZES[cfg.model.size][0]


def vit_backbone_flops(
    cfg: Config, image_size: int, frozen_embed: bool = False, kept_patches: int | None = None
) -> FlopCount:
    """One image through the backbone; a frozen patch embedding (MoCo v3) gets no backward FLOPs."""
    dim, depth, _ = VIT_SIZES[cfg.model.size]
    model = cfg.model
    embed, body = vit_flops(image_size, model.patch_size, model.in_chans, dim, depth, kept_patches=kept_patches)
    return FlopCount(body, embed) if frozen_embed else FlopCount(embed + body)
