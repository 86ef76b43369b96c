"""One random-resized crop of each image (MAE, rotation prediction): the per-sample transform, its device half,
and the crop views that data backends which crop by themselves (DALI) reproduce."""

from __future__ import annotations

from data_pipeline.augment import mae_transform
from data_pipeline.fast_crops import CropView, DeviceNormalize, FastCrops
from pretrain.config import Config
from pretrain.methods.spec import CropViews


def single_crop_transform(cfg: Config):
    data = cfg.data
    if data.decode == "fast":  # uint8 out: single_crop_device_transform normalizes whole batches on the device
        return FastCrops([CropView(data.image_size, data.crop_scale)], data.hflip, data.mean, data.std, single=True)
    return mae_transform(data.image_size, data.crop_scale, data.mean, data.std, data.hflip)


def single_crop_device_transform(cfg: Config) -> DeviceNormalize | None:
    uint8 = cfg.data.decode == "fast" or cfg.data.backend == "dali"
    return DeviceNormalize(cfg.data.mean, cfg.data.std) if uint8 else None


def single_crop_views(cfg: Config) -> CropViews:
    return CropViews([(cfg.data.image_size, cfg.data.crop_scale)], single=True)
