"""A DataLoader over `ShardStream` whose `state_dict()` is the exact data position of what the caller got.

Positions come from the "stream" metadata of the batches handed to the caller, not of batches the
workers prefetched, so a checkpoint taken after step N resumes with batch N + 1, bit for bit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from data_pipeline.label_subset import LabelSubset
from data_pipeline.reader import Batch, ImageTransform, ShardStream, StreamPosition, position_from_state

log = logging.getLogger("data_pipeline")

STATE_VERSION = 1
# Settings that fix which sample sits at which (stream, epoch, offset); a change invalidates positions.
_LAYOUT_KEYS = ("num_streams", "seed", "num_shards", "shuffle_buffer", "resampled", "subset")


class ResumableLoader:
    """Iterate batches from shards; `state_dict()` / `load_state_dict()` save and restore the position.

    A new `iter()` continues from the current position. In finite mode (`infinite=False`) each
    completed pass moves every stream to the start of its next epoch.
    """

    def __init__(
        self,
        shards: str | list[str],
        *,
        batch_size: int,
        transform: ImageTransform,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        shuffle_buffer: int = 1000,
        resampled: bool = False,
        infinite: bool = True,
        start_epoch: int = 0,
        drop_last: bool = False,
        split: str = "train",
        pin_memory: bool = False,
        prefetch_factor: int = 2,
        subset: LabelSubset | None = None,
    ) -> None:
        """`subset`: read only its samples (a label fraction for semi-supervised fine-tuning)."""
        self.subset = subset
        self.dataset = ShardStream(
            shards,
            batch_size=batch_size,
            transform=transform,
            seed=seed,
            rank=rank,
            world_size=world_size,
            num_workers=num_workers,
            shuffle_buffer=shuffle_buffer,
            resampled=resampled,
            infinite=infinite,
            start_epoch=start_epoch,
            drop_last=drop_last,
            split=split,
            keys=subset.keys if subset is not None else None,
        )
        self.num_workers = num_workers
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.prefetch_factor = prefetch_factor
        self._positions = {s: StreamPosition(start_epoch) for s in self.dataset.stream_ids}
        self._batches = 0
        self._rotation = 0  # which logical worker DataLoader worker 0 plays next
        self._skipped_base = 0  # samples skipped by streams of an earlier, incompatible layout
        self._skipped_shards_base = 0
        self._generation = 0  # the newest iterator; older ones must not move the position

    @property
    def num_streams(self) -> int:
        return self.dataset.num_streams

    @property
    def batches_consumed(self) -> int:
        return self._batches

    @property
    def skipped_total(self) -> int:
        """Samples skipped as unreadable or lost with a failed shard, over this rank's streams and epochs."""
        return self._skipped_base + sum(p.skipped for p in self._positions.values())

    @property
    def skipped_shards_total(self) -> int:
        """Shard failures (could not open, or not read to the end), over this rank's streams and epochs."""
        return self._skipped_shards_base + sum(p.skipped_shards for p in self._positions.values())

    def __iter__(self) -> Iterator[Batch]:
        self._generation += 1
        return self._iterate(self._generation)

    def _iterate(self, generation: int) -> Iterator[Batch]:
        self.dataset.positions = dict(self._positions)
        self.dataset.worker_rotation = self._rotation
        loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor if self.num_workers > 0 else None,
            # Workers derive all randomness from (seed, epoch, stream); a private generator keeps the
            # DataLoader from drawing its base seed from the global RNG, which training resume restores.
            generator=torch.Generator().manual_seed(self.dataset.seed),
        )
        for batch in loader:
            if generation != self._generation:
                raise RuntimeError(
                    "this ResumableLoader iterator is stale: a later iter() or load_state_dict() replaced it"
                )
            meta = batch["stream"]
            self._positions[meta["stream"]] = position_from_state(meta)
            self._batches += 1
            self._rotation = (self._rotation + 1) % self.dataset.workers_per_rank
            yield batch
        if generation == self._generation:
            self._positions = {
                s: StreamPosition(p.epoch + 1, 0, p.skipped, p.skipped_shards) for s, p in self._positions.items()
            }
            self._rotation = 0

    def _layout(self) -> dict[str, Any]:
        ds = self.dataset
        return {
            "num_streams": ds.num_streams,
            "seed": ds.seed,
            "num_shards": len(ds.shards),
            "shuffle_buffer": ds.shuffle_buffer,
            "resampled": ds.resampled,
            "subset": self.subset.digest if self.subset is not None else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "streams": {
                s: {"epoch": p.epoch, "offset": p.offset, "skipped": p.skipped, "skipped_shards": p.skipped_shards}
                for s, p in self._positions.items()
            },
            "batches": self._batches,
            "rotation": self._rotation,
            "skipped_base": self._skipped_base,
            "skipped_total": self.skipped_total,
            "skipped_shards_base": self._skipped_shards_base,
            "skipped_shards_total": self.skipped_shards_total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume exactly where `state` was taken; under a different layout, restart all streams at the
        start of the earliest saved epoch (repeats some samples, loses none).

        `state["streams"]` may cover more streams than this rank reads (the ranks' states merged), which
        lets every rank of a job at a new world size restart at the same epoch.
        """
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')!r} is not {STATE_VERSION}")
        self._generation += 1
        saved = {int(s): position_from_state(p) for s, p in state["streams"].items()}
        self._batches = int(state["batches"])
        changed = {k: (state.get(k), v) for k, v in self._layout().items() if state.get(k) != v}
        if not changed and set(self._positions) <= set(saved):
            self._positions = {s: saved[s] for s in self._positions}
            self._rotation = int(state["rotation"])
            self._skipped_base = int(state["skipped_base"])
            self._skipped_shards_base = int(state.get("skipped_shards_base", 0))
            return
        epoch = min((p.epoch for p in saved.values()), default=self.dataset.start_epoch)
        log.warning(
            "data loader state does not match this loader (%s); restarting all %d streams at the start of epoch %d",
            ", ".join(f"{k}: saved {old!r}, now {new!r}" for k, (old, new) in changed.items()) or "other stream ids",
            len(self._positions),
            epoch,
        )
        self._positions = {s: StreamPosition(epoch) for s in self._positions}
        self._rotation = 0
        self._skipped_base = int(state.get("skipped_total", 0))
        self._skipped_shards_base = int(state.get("skipped_shards_total", 0))


def merge_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
    """One state covering the streams of several ranks, for resuming at another world size.

    Each rank then continues its streams exactly if the stream layout is unchanged, or restarts at
    the earliest saved epoch otherwise (see `ResumableLoader.load_state_dict`).
    """
    if not states:
        raise ValueError("no data loader states to merge")
    merged = dict(states[0])
    merged["streams"] = {s: p for state in states for s, p in state["streams"].items()}
    merged["skipped_total"] = sum(int(state.get("skipped_total", 0)) for state in states)
    merged["skipped_shards_total"] = sum(int(state.get("skipped_shards_total", 0)) for state in states)
    return merged
