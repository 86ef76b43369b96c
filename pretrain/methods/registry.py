"""Method name -> how to build it and what its training samples look like; the only place that knows every
method by name (the loop, the data loader and the config checks look methods up here)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain import flops as analytic
from pretrain.config import Config
from pretrain.methods.base import Method


@dataclass(frozen=True)
class MethodSpec:
    build: Callable[[Config], Method]
    # (PIL image, torch.Generator) -> tensor, or a list of tensors for multi-view methods
    train_transform: Callable[[Config], Callable]
    # batch -> batch on the device after transfer (e.g. batched color augmentation), or None
    device_transform: Callable[[Config], Callable | None] | None = None
    # cfg -> analytic FLOPs per sample, {"forward": ..., "train": ...} (pretrain/flops.py), or None if not counted
    flops: Callable[[Config], dict[str, float]] | None = None


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
    from data_pipeline.fast_crops import CropView, FastCrops

    data = cfg.data
    if data.decode == "fast":  # uint8 out; mae_device_transform normalizes
        return FastCrops([CropView(data.image_size, data.crop_scale)], data.hflip, data.mean, data.std, single=True)
    return mae_transform(data.image_size, data.crop_scale, data.mean, data.std, data.hflip)


def mae_device_transform(cfg: Config):
    from data_pipeline.fast_crops import DeviceNormalize

    uint8 = cfg.data.decode == "fast" or cfg.data.backend == "dali"
    return DeviceNormalize(cfg.data.mean, cfg.data.std) if uint8 else None


def build_dit(cfg: Config) -> Method:
    from pretrain.methods.dit import build_dit_method

    return build_dit_method(cfg)


def dit_train_transform(cfg: Config):
    from pretrain.methods.dit import dit_train_transform as transform

    return transform(cfg)


def build_vae(cfg: Config) -> Method:
    from pretrain.methods.vae import build_vae_method

    return build_vae_method(cfg)


def vae_train_transform(cfg: Config):
    from pretrain.diffusion.transforms import pixel_transform

    return pixel_transform(cfg.data.image_size, cfg.method.vae.in_channels, cfg.data.crop_scale, cfg.data.hflip)


def build_moco(cfg: Config) -> Method:
    from pretrain.methods.moco import MoCoV3

    moco = cfg.method.moco
    return MoCoV3(
        build_encoder(cfg),
        proj_dim=moco.proj_dim,
        mlp_dim=moco.mlp_dim,
        temperature=moco.temperature,
        momentum=moco.momentum,
        freeze_patch_embed=moco.freeze_patch_embed,
        infonce_impl=moco.infonce_impl,
    )


def build_dino(cfg: Config) -> Method:
    from pretrain.methods.dino import DINO

    dino = cfg.method.dino
    return DINO(
        build_encoder(cfg),
        out_dim=dino.out_dim,
        hidden_dim=dino.hidden_dim,
        bottleneck_dim=dino.bottleneck_dim,
        head_layers=dino.head_layers,
        norm_last_layer=dino.norm_last_layer,
        student_temp=dino.student_temp,
        teacher_temp=dino.teacher_temp,
        warmup_teacher_temp=dino.warmup_teacher_temp,
        warmup_teacher_temp_steps=dino.warmup_teacher_temp_steps,
        center_momentum=dino.center_momentum,
        momentum=dino.momentum,
        freeze_last_layer_steps=dino.freeze_last_layer_steps,
        pool=dino.pool,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def joint_embedding_transform(cfg: Config):
    """MoCo v3: 2 views; DINO: 2 global + data.local_crops local views."""
    from data_pipeline.fast_crops import CropView, FastCrops
    from data_pipeline.views import MultiView, joint_embedding_views

    data = cfg.data
    if data.decode == "fast":  # uint8 out unless color runs in the workers; DeviceColor converts
        in_workers = data.color_augment_on == "workers"
        views = [CropView(v.size, v.scale, v.color if in_workers else None) for v in joint_embedding_views(data)]
        return FastCrops(views, data.hflip, data.mean, data.std)
    return MultiView(
        joint_embedding_views(data),
        data.hflip,
        data.mean,
        data.std,
        color_in_workers=data.color_augment_on == "workers",
    )


def joint_embedding_device_transform(cfg: Config):
    from data_pipeline.views import DeviceColor, joint_embedding_views

    data = cfg.data
    return DeviceColor(joint_embedding_views(data), data.mean, data.std) if data.color_augment_on == "device" else None


def _summary(count: Callable[[Config], analytic.FlopCount]) -> Callable[[Config], dict[str, float]]:
    return lambda cfg: count(cfg).summary()


METHODS: dict[str, MethodSpec] = {
    "mae": MethodSpec(build_mae, mae_train_transform, mae_device_transform, flops=_summary(analytic.mae_flops)),
    "moco": MethodSpec(
        build_moco, joint_embedding_transform, joint_embedding_device_transform, flops=_summary(analytic.moco_flops)
    ),
    "dino": MethodSpec(
        build_dino, joint_embedding_transform, joint_embedding_device_transform, flops=_summary(analytic.dino_flops)
    ),
    "dit": MethodSpec(build_dit, dit_train_transform, flops=_summary(analytic.dit_flops)),
    "vae": MethodSpec(build_vae, vae_train_transform),
}


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name].build(cfg)


def build_train_transform(cfg: Config):
    return METHODS[cfg.method.name].train_transform(cfg)


def flops_per_sample(cfg: Config) -> dict[str, float] | None:
    """{"forward": ..., "train": ...} analytic FLOPs of one sample, or None for methods without a count."""
    count = METHODS[cfg.method.name].flops
    return count(cfg) if count is not None else None


def build_device_transform(cfg: Config):
    """The method's batch transform on the device, or None."""
    make = METHODS[cfg.method.name].device_transform
    return make(cfg) if make is not None else None
