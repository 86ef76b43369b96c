"""Views for joint-embedding methods (MoCo v3: 2 views; DINO: 2 global + data.local_crops local views)."""

from __future__ import annotations

from data_pipeline.fast_crops import CropView, FastCrops
from data_pipeline.views import DeviceColor, MultiView, joint_embedding_views
from pretrain.config import Config
from pretrain.methods.spec import CropViews


def joint_embedding_transform(cfg: Config) -> MultiView | FastCrops:
    data = cfg.data
    in_workers = data.color_augment_on == "workers"
    if data.decode == "fast":  # uint8 out unless color runs in the workers; DeviceColor converts
        views = [CropView(v.size, v.scale, v.color if in_workers else None) for v in joint_embedding_views(data)]
        return FastCrops(views, data.hflip, data.mean, data.std)
    return MultiView(joint_embedding_views(data), data.hflip, data.mean, data.std, color_in_workers=in_workers)


def joint_embedding_device_transform(cfg: Config) -> DeviceColor | None:
    """Color augmentation batched on the device after transfer, unless data.color_augment_on = "workers"."""
    data = cfg.data
    return DeviceColor(joint_embedding_views(data), data.mean, data.std) if data.color_augment_on == "device" else None


def joint_embedding_crop_views(cfg: Config) -> CropViews:
    return CropViews([(view.size, view.scale) for view in joint_embedding_views(cfg.data)], single=False)
