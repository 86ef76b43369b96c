"""Data loaders built from the config: the training stream and the finite evaluation passes."""

from __future__ import annotations

from data_pipeline.augment import eval_transform
from data_pipeline.loader import ResumableLoader
from pretrain.config import Config, ConfigError
from pretrain.methods.registry import build_train_transform
from pretrain.runtime.world import WorldInfo


def build_train_loader(cfg: Config, world: WorldInfo) -> ResumableLoader:
    data = cfg.data
    if not data.shards:
        raise ConfigError("data.shards: empty; set it to a manifest.json, a shard directory, a brace pattern or URLs")
    try:
        return _train_loader(cfg, world)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"data.shards: {exc}") from exc


def _train_loader(cfg: Config, world: WorldInfo) -> ResumableLoader:
    data = cfg.data
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
