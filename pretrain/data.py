"""Data loaders built from the config: the training stream and the finite evaluation passes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from data_pipeline.augment import eval_transform
from data_pipeline.label_subset import label_subset
from data_pipeline.loader import ResumableLoader
from data_pipeline.shardlist import resolve_shards
from pretrain.config import Config, ConfigError
from pretrain.methods.registry import METHODS, build_train_transform
from pretrain.runtime.world import WorldInfo

if TYPE_CHECKING:
    from data_pipeline.dali_loader import DaliLoader


def check_data_spec(cfg: Config) -> None:
    """data.shards names shards (cheap: globs and manifests, no reading), before a run directory exists."""
    if not cfg.data.shards:
        raise ConfigError("data.shards: empty; set it to a manifest.json, a shard directory, a brace pattern or URLs")
    try:
        resolve_shards(cfg.data.shards, cfg.data.split)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.shards: {exc}") from exc


def build_train_loader(cfg: Config, world: WorldInfo) -> ResumableLoader:
    check_data_spec(cfg)
    try:
        return _train_loader(cfg, world)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.shards: {exc}") from exc


def _train_loader(cfg: Config, world: WorldInfo) -> ResumableLoader | DaliLoader:
    data = cfg.data
    if data.backend == "dali":
        return _dali_loader(cfg, world)
    subset = (
        label_subset(data.shards, data.split, data.label_fraction, data.label_seed) if data.label_fraction < 1 else None
    )
    return ResumableLoader(
        data.shards,
        batch_size=data.batch_size,
        transform=build_train_transform(cfg),
        seed=cfg.run.seed,
        rank=world.rank,
        world_size=world.world_size,
        num_workers=data.num_workers,
        shuffle_buffer=data.shuffle_buffer,
        resampled=data.resampled,
        infinite=True,
        split=data.split,
        pin_memory=data.pin_memory,
        prefetch_factor=data.prefetch_factor,
        subset=subset,
    )


def validate_data_backend(cfg: Config) -> None:
    """data.backend = "dali" crops images itself, so the method must train on crops of images (its spec's
    crop_views), leave color to the device, and DALI must be installed."""
    if cfg.data.backend != "dali":
        return
    from data_pipeline.dali_loader import dali_available

    if cfg.data.label_fraction < 1:
        raise ConfigError("data.label_fraction: label subsets are read by the pil backend only; set data.backend='pil'")
    if METHODS[cfg.method.name].crop_views is None:
        raise ConfigError(
            f"data.backend: 'dali' makes random-resized crops of images; method '{cfg.method.name}' does not train on them"
        )
    if cfg.data.color_augment_on != "device":
        raise ConfigError("data.color_augment_on: the dali backend leaves color to the device; set 'device'")
    if why := dali_available():
        raise ConfigError(f"data.backend: {why}")


def _dali_loader(cfg: Config, world: WorldInfo) -> DaliLoader:
    """The same shards and views through DALI (nvJPEG on CUDA); uint8 out, normalized on the device."""
    from data_pipeline.dali_loader import DaliLoader
    from pretrain.engines.base import resolve_device

    data = cfg.data
    crops = METHODS[cfg.method.name].crop_views(cfg)
    return DaliLoader(
        data.shards,
        batch_size=data.batch_size,
        views=crops.views,
        single=crops.single,
        hflip=data.hflip,
        seed=cfg.run.seed,
        rank=world.rank,
        world_size=world.world_size,
        num_threads=max(1, data.num_workers),
        shuffle_buffer=data.shuffle_buffer,
        split=data.split,
        device=resolve_device(cfg.run.device, world),
    )


def build_eval_loader(cfg: Config, shards: str, split: str, num_workers: int = 0) -> ResumableLoader:
    """One ordered pass over a split (no shuffling, no augmentation) on this process."""
    image_size = cfg.eval.image_size or cfg.data.image_size
    return ResumableLoader(
        shards,
        batch_size=cfg.eval.batch_size,
        transform=eval_transform(image_size, cfg.data.mean, cfg.data.std),
        seed=cfg.run.seed,
        num_workers=num_workers,
        shuffle_buffer=0,
        infinite=False,
        split=split,
    )
