"""Deterministic, exactly resumable streaming of batches from WebDataset tar shards.

Work is split into `world_size * max(1, num_workers)` streams; stream `rank * W + worker` reads, in
epoch e, its slice of a shard permutation seeded by (seed, e), through a shuffle buffer seeded by
(seed, e, stream). Every sample's augmentation draws from a generator seeded by (seed, e, key), so
it does not depend on which stream or worker produced it. A stream's position is (epoch, offset,
skipped), offset counting raw samples taken in that epoch; resuming replays the epoch's raw records
(tar reading and buffer draws only, no decoding) up to the offset, which reproduces the stream exactly.

Unreadable shards and undecodable samples are skipped, counted and logged once: they never stop training.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from itertools import chain
from typing import Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from data_pipeline.decode import IMAGE_EXTENSIONS, LATENT_EXTENSION, DecodeError, decode_record
from data_pipeline.shardlist import resolve_shards, shard_sample_counts

log = logging.getLogger("data_pipeline")

Record = dict[str, Any]  # one raw sample: "__key__", "__url__" and member bytes by extension
Batch = dict[str, Any]
ImageTransform = Callable[[Image.Image, torch.Generator], Any]  # -> a tensor, or a list of views
T = TypeVar("T")

_KEPT_MEMBERS = frozenset(IMAGE_EXTENSIONS) | {"cls", LATENT_EXTENSION}


@dataclass(frozen=True)
class StreamPosition:
    """Where a stream stands: `offset` raw samples taken in `epoch`. Over all epochs, `skipped` counts the
    samples lost (undecodable ones, and the unread rest of failed shards where a manifest gives their
    size) and `skipped_shards` the shards that failed to open or read to the end."""

    epoch: int
    offset: int = 0
    skipped: int = 0
    skipped_shards: int = 0


@dataclass(frozen=True)
class ShardFailure:
    """Marks the point in a record stream where a shard could not be (further) read."""

    url: str
    reason: str
    lost: int | None = None  # samples of the shard not read; None when no manifest gives its size
    after_key: str | None = None  # the last sample read before the failure


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is the same in every process and Python version (unlike `hash()`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _is_kept_member(fname: str) -> bool:
    _, ext = base_plus_ext(fname)
    return ext is not None and ext.lower() in _KEPT_MEMBERS


def read_shard(url: str) -> Iterator[Record | ShardFailure]:
    """The raw records of one shard, followed by a `ShardFailure` if it could not be read to the end."""
    try:
        stream = gopen(url)
    except Exception as exc:  # gopen raises whatever its scheme's opener raises
        yield ShardFailure(url, f"cannot open: {type(exc).__name__}: {exc}")
        return
    try:
        files = tar_file_expander(
            [{"url": url, "stream": stream}], handler=reraise_exception, select_files=_is_kept_member
        )
        yield from group_by_keys(files, handler=reraise_exception)
        stream.close()  # a pipe: reports its command's failure here
    except Exception as exc:  # tarfile and gopen pipes raise several types for bad data
        detail = exc.args[0] if exc.args else ""
        yield ShardFailure(url, f"{type(exc).__name__}: {detail}")
    finally:
        try:
            stream.close()
        except Exception:  # closing early: a pipe's command exits on a broken pipe
            pass


def shuffled(items: Iterable[T], size: int, rng: random.Random) -> Iterator[T]:
    """Items in an order drawn through a buffer of `size` (0 or 1: as they come).

    `ShardFailure`s pass straight through, so they appear where the reading hit them.
    """
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if isinstance(item, ShardFailure):
            yield item
            continue
        buffer.append(item)
        if len(buffer) >= size:
            yield _pop_random(buffer, rng)
    while buffer:
        yield _pop_random(buffer, rng)


def _pop_random(buffer: list[T], rng: random.Random) -> T:
    i = rng.randrange(len(buffer))
    buffer[i], buffer[-1] = buffer[-1], buffer[i]
    return buffer.pop()


class ShardStream(IterableDataset):
    """Batches (dicts) of decoded, augmented samples; see the module docstring for the ordering.

    Each batch is {"image": FloatTensor[B, C, H, W] (a list of those for multi-view transforms),
    "label": LongTensor[B], "key": list[str], "stream": {"stream", "epoch", "offset", "skipped", "skipped_shards"}},
    the last being the stream's position after the batch. `positions` resumes streams;
    `worker_rotation` maps DataLoader worker w to logical worker (w + rotation) % num_workers, so a
    resumed DataLoader's round-robin continues with the right stream.
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
        positions: Mapping[int, StreamPosition] | None = None,
        worker_rotation: int = 0,
        keys: frozenset[str] | None = None,
    ) -> None:
        super().__init__()
        for name, value, low in [
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 0),
            ("shuffle_buffer", shuffle_buffer, 0),
            ("start_epoch", start_epoch, 0),
        ]:
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.shards = resolve_shards(shards, split)
        self.shard_samples = shard_sample_counts(shards, split)
        self.batch_size, self.transform, self.seed = batch_size, transform, seed
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.shuffle_buffer, self.resampled, self.infinite = shuffle_buffer, resampled, infinite
        self.start_epoch, self.drop_last = start_epoch, drop_last
        self.workers_per_rank = max(1, num_workers)
        self.num_streams = world_size * self.workers_per_rank
        if not resampled and len(self.shards) < self.num_streams:
            raise ValueError(
                f"{len(self.shards)} shards cannot feed {self.num_streams} streams (world_size {world_size} x "
                f"{self.workers_per_rank} workers): write at least {self.num_streams} shards, use fewer workers, "
                f"or resampled=True"
            )
        self.positions = dict(positions or {})
        self.worker_rotation = worker_rotation
        # Only samples with these keys (a label subset, data_pipeline/label_subset.py); None: all.
        self.keys = keys
        self._reported: set[str] = set()

    @property
    def stream_ids(self) -> range:
        """The streams this rank reads."""
        return range(self.rank * self.workers_per_rank, (self.rank + 1) * self.workers_per_rank)

    def start_position(self, stream: int) -> StreamPosition:
        return self.positions.get(stream, StreamPosition(self.start_epoch))

    def epoch_shards(self, stream: int, epoch: int) -> list[str]:
        if self.resampled:
            rng = random.Random(derive_seed(self.seed, "resample", epoch, stream))
            return rng.choices(self.shards, k=math.ceil(len(self.shards) / self.num_streams))
        order = list(self.shards)
        random.Random(derive_seed(self.seed, "shards", epoch)).shuffle(order)
        return order[stream :: self.num_streams]

    def epoch_records(self, stream: int, epoch: int) -> Iterator[Record | ShardFailure]:
        """The raw, shuffled records of one stream's epoch: the sequence that offsets count. Records outside
        `keys` are dropped before the shuffle buffer, so it mixes only samples that are used."""
        records = chain.from_iterable(self._read_counted(url) for url in self.epoch_shards(stream, epoch))
        if self.keys is not None:
            keys = self.keys
            records = (r for r in records if isinstance(r, ShardFailure) or r.get("__key__") in keys)
        return shuffled(records, self.shuffle_buffer, random.Random(derive_seed(self.seed, "buffer", epoch, stream)))

    def _read_counted(self, url: str) -> Iterator[Record | ShardFailure]:
        """`read_shard`, with a failure saying how many samples were lost (from the manifest) and after which key."""
        read, last_key = 0, None
        for item in read_shard(url):
            if isinstance(item, ShardFailure):
                expected = self.shard_samples.get(url)
                lost = max(0, expected - read) if expected is not None else None
                yield ShardFailure(item.url, item.reason, lost, last_key)
                return
            read, last_key = read + 1, item.get("__key__")
            yield item

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        if info is None:
            if self.num_workers > 0:
                raise RuntimeError(
                    f"ShardStream built for num_workers={self.num_workers} is iterated outside DataLoader "
                    f"workers; use a DataLoader with that many workers, or iter_worker(w) for each w"
                )
            return self.iter_worker(0)
        if info.num_workers != self.num_workers:
            raise RuntimeError(
                f"ShardStream built for num_workers={self.num_workers} runs in a DataLoader with {info.num_workers}"
            )
        return self.iter_worker((info.id + self.worker_rotation) % info.num_workers)

    def iter_worker(self, worker: int) -> Iterator[Batch]:
        """The batches of this rank's logical worker `worker`, from its start position."""
        if worker not in range(self.workers_per_rank):
            raise ValueError(f"worker {worker} is outside [0, {self.workers_per_rank})")
        return self._batches(self.stream_ids[worker])

    def _batches(self, stream: int) -> Iterator[Batch]:
        start = self.start_position(stream)
        epoch, offset, skipped, skipped_shards = start.epoch, start.offset, start.skipped, start.skipped_shards
        failed: set[str] = set()
        pending: list[tuple[str, Any, int]] = []
        while True:
            records = self.epoch_records(stream, epoch)
            _discard_records(records, offset, stream, epoch)
            for item in records:
                if isinstance(item, ShardFailure):
                    skipped_shards += 1
                    skipped += item.lost or 0
                    failed.add(item.url)
                    where = f"after sample {item.after_key!r}" if item.after_key else "at its start"
                    lost = (
                        f"{item.lost} samples lost" if item.lost is not None else "samples lost: unknown (no manifest)"
                    )
                    self._warn_once(
                        item.url,
                        "skipping shard %s %s (%s) in stream %d: %s",
                        item.url,
                        where,
                        lost,
                        stream,
                        item.reason,
                    )
                    continue
                offset += 1
                try:
                    pending.append(self._prepare(item, epoch))
                except DecodeError as exc:
                    skipped += 1
                    url = item.get("__url__", "?")
                    self._warn_once(
                        f"{url}\x1f{exc.key}", "skipping sample %r of shard %s: %s", exc.key, url, exc.reason
                    )
                if len(pending) == self.batch_size:
                    yield _collate(pending, stream, StreamPosition(epoch, offset, skipped, skipped_shards))
                    pending = []
            if not self.infinite:
                break
            if offset == 0 and failed >= set(self.shards):
                raise RuntimeError(f"stream {stream}: every shard failed to read ({sorted(failed)[:3]}...)")
            if offset == 0 and self.keys is not None:
                raise RuntimeError(
                    f"stream {stream}: its shards of epoch {epoch} hold none of the {len(self.keys)} samples of the "
                    "label subset; use fewer streams (processes x data.num_workers) or a larger data.label_fraction"
                )
            epoch, offset = epoch + 1, 0
        if pending and not self.drop_last:
            yield _collate(pending, stream, StreamPosition(epoch, offset, skipped, skipped_shards))

    def _prepare(self, record: Record, epoch: int) -> tuple[str, Any, int]:
        # Transforms that choose how to decode (the fast crop path) get the image undecoded.
        image, label = decode_record(record, encoded=getattr(self.transform, "accepts_encoded", False))
        key = record["__key__"]
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "augment", epoch, key))
        try:
            return key, self.transform(image, gen), label
        except DecodeError as exc:  # a transform's check of the decoded values names no key: this is the record's
            if exc.key:
                raise
            raise DecodeError(key, exc.reason) from exc

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if what not in self._reported:
            self._reported.add(what)
            log.warning(message, *args)


def _discard_records(records: Iterator[Record | ShardFailure], count: int, stream: int, epoch: int) -> None:
    """Advance past the first `count` records (failures before them were counted when first met)."""
    taken = 0
    while taken < count:
        item = next(records, None)
        if item is None:
            raise RuntimeError(
                f"cannot resume stream {stream} at epoch {epoch} offset {count}: the epoch has only {taken} "
                f"samples (did the shards change?)"
            )
        if not isinstance(item, ShardFailure):
            taken += 1


def _position_state(position: StreamPosition) -> dict[str, int]:
    return {
        "epoch": position.epoch,
        "offset": position.offset,
        "skipped": position.skipped,
        "skipped_shards": position.skipped_shards,
    }


def position_from_state(state: Mapping[str, Any]) -> StreamPosition:
    """A position saved by `_position_state` (states written before shards were counted lack the field)."""
    return StreamPosition(
        int(state["epoch"]), int(state["offset"]), int(state["skipped"]), int(state.get("skipped_shards", 0))
    )


def _collate(samples: list[tuple[str, Any, int]], stream: int, position: StreamPosition) -> Batch:
    keys, images, labels = zip(*samples)
    if isinstance(images[0], torch.Tensor):
        batched: Any = torch.stack(images)
    else:  # multi-view transforms: one [B, C, H, W] tensor per view
        batched = [torch.stack(views) for views in zip(*images)]
    return {
        "image": batched,
        "label": torch.tensor(labels, dtype=torch.long),
        "key": list(keys),
        "stream": {"stream": stream, **_position_state(position)},
    }
