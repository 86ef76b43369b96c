"""Method name -> how to build it and what its training samples look like; the only place that knows every
method by name (the loop, the data loader and the config checks look methods up here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.config import Config
from pretrain.methods.base import Method


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[Config], Method]
    # (PIL image, torch.Generator) -> tensor, or a list of tensors for multi-view methods
    train_transform: Callable[[Config], Callable]


def build_encoder(cfg: Config):
    from pretrain.models.vit import build_vit

    return build_vit(
        cfg.model.size,
        img_size=cfg.data.image_size,
        patch_size=cfg.model.patch_size,
        in_chans=cfg.model.in_chans,
        attn_backend=cfg.model.attn_backend,
    )


def build_mae(cfg: Config) -> Method:
    from pretrain.methods.mae import MaskedAutoencoder

    mae = cfg.method.mae
    return MaskedAutoencoder(
        build_encoder(cfg),
        decoder_dim=mae.decoder_dim,
        decoder_depth=mae.decoder_depth,
        decoder_heads=mae.decoder_heads,
        mask_ratio=mae.mask_ratio,
        norm_pix_loss=mae.norm_pix_loss,
        attn_backend=cfg.model.attn_backend,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def mae_train_transform(cfg: Config):
    from data_pipeline.augment import mae_transform

    data = cfg.data
    return mae_transform(data.image_size, data.crop_scale, data.mean, data.std, data.hflip)


METHODS: dict[str, MethodSpec] = {
    "mae": MethodSpec(build_mae, mae_train_transform),
}


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name].build(cfg)


def build_train_transform(cfg: Config):
    return METHODS[cfg.method.name].train_transform(cfg)
