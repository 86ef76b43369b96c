"""Method name -> builder from the config; the only place that knows every method by name."""

from __future__ import annotations

from collections.abc import Callable

from pretrain.config import Config
from pretrain.methods.base import Method


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


METHODS: dict[str, Callable[[Config], Method]] = {"mae": build_mae}


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name](cfg)
