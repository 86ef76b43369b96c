"""Views for joint-embedding methods (MoCo v3: 2 views; DINO: 2 global + data.local_crops local views)."""

from __future__ import annotations

from data_pipeline.views import DeviceColor, MultiView, joint_embedding_views
from pretrain.config import Config


def joint_embedding_transform(cfg: Config) -> MultiView:
    data = cfg.data
    return MultiView(
        joint_embedding_views(data),
        data.hflip,
        data.mean,
        data.std,
        color_in_workers=data.color_augment_on == "workers",
    )


def joint_embedding_device_transform(cfg: Config) -> DeviceColor | None:
    """Color augmentation batched on the device after transfer, unless data.color_augment_on = "workers"."""
    data = cfg.data
    return DeviceColor(joint_embedding_views(data), data.mean, data.std) if data.color_augment_on == "device" else None
