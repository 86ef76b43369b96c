"""`data.backend = "dali"`: the same shards and augmentations through an NVIDIA DALI pipeline.

Reads the WebDataset shards with `fn.readers.webdataset` (through index files that leave bad data out,
`dali_index.py`), decodes with nvJPEG ("mixed") on CUDA and libjpeg-turbo on the CPU, and applies the
random resized crop (bicubic, antialiased), horizontal flip and, for multi-view methods, one crop per
view of the once-decoded image. Views leave as uint8 [B, 3, H, W]; the method's device transform
converts and normalizes them (`fast_crops.DeviceNormalize`, `views.DeviceColor`), as on the fast
CPU path.

Its random numbers are DALI's, not the default path's: the two backends sample the same distributions
(crop area and log-aspect, flip probability), not the same crops.

Resume semantics. The checkpointed position is DALI's own pipeline checkpoint (every reader's
position and every random generator's state, `Pipeline.checkpoint()`), taken after the batches handed
out so far. Resuming with the same shards, batch size, seed, world size and views continues exactly:
the next batch is the one the uninterrupted run would have produced, bit for bit. Anything else
(another world size, other shards) restarts the pipeline from its first sample (a fresh epoch), which
repeats some samples and loses none, with the skip count carried over.
"""

from __future__ import annotations

import base64
import logging
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.dali_index import DALI_IMAGE_EXTENSIONS, ShardIndex, build_indexes
from data_pipeline.reader import derive_seed
from data_pipeline.shardlist import resolve_shards, shard_sample_counts

log = logging.getLogger("data_pipeline")

STATE_VERSION = "dali-1"
_LAYOUT_KEYS = ("world_size", "rank", "seed", "shards", "batch_size", "views", "hflip", "shuffle_buffer")


def dali_available() -> str | None:
    """None if DALI imports, else why not (for skips and config errors)."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as exc:
        return f"NVIDIA DALI is not installed ({exc}); pip install -e .[dali]"
    return None


class DaliLoader:
    """Batches {"image": uint8 [B, 3, H, W] (a list of those for multi-view), "label", "key"} from a DALI
    pipeline; `state_dict()` / `load_state_dict()` as `ResumableLoader`'s (see the module docstring)."""

    def __init__(
        self,
        shards: str | list[str],
        *,
        batch_size: int,
        views: Sequence[tuple[int, tuple[float, float]]],
        single: bool = False,
        hflip: float = 0.5,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_threads: int = 1,
        shuffle_buffer: int = 1000,
        split: str = "train",
        device: str | torch.device = "cpu",
        index_dir: str | Path | None = None,
    ) -> None:
        if why := dali_available():
            raise RuntimeError(why)
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if single and len(views) != 1:
            raise ValueError(f"single=True needs exactly one view, got {len(views)}")
        self.urls = resolve_shards(shards, split)
        self.batch_size, self.views, self.single, self.hflip = batch_size, [tuple(v) for v in views], single, hflip
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_threads, self.shuffle_buffer, self.device = max(1, num_threads), shuffle_buffer, device
        self._tmp = tempfile.TemporaryDirectory(prefix="dali-index-") if index_dir is None else None
        index_root = Path(index_dir) if index_dir is not None else Path(self._tmp.name)
        self.paths, self.index_paths, indexes = build_indexes(self.urls, index_root / f"rank{rank:05d}")
        if not self.paths:
            raise RuntimeError(f"no readable samples in {len(self.urls)} shards ({self.urls[:3]}...)")
        self.num_samples = sum(len(index.samples) for index in indexes)
        # Each rank counts its share of the bad data once per epoch, as the default path's streams do.
        self.skipped_per_epoch, self.skipped_shards_per_epoch = _bad_items(
            indexes, shard_sample_counts(shards, split), rank, world_size
        )
        self._pipe: Any = None
        self._checkpoint: bytes | None = None
        self._batches = 0
        self._skipped_base = 0
        self._skipped_shards_base = 0
        self._start_batches = 0  # batches before the current pipeline started from its first sample

    # ------------------------------------------------------------------ position

    @property
    def batches_consumed(self) -> int:
        return self._batches

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank reads per epoch (DALI splits the sample list into world_size parts)."""
        return max(1, self.num_samples // self.world_size)

    @property
    def _epochs_begun(self) -> int:
        return (self._batches - self._start_batches) * self.batch_size // self.samples_per_epoch + 1

    @property
    def skipped_total(self) -> int:
        """Samples skipped or lost with failed shards (where the manifest gives their size)."""
        return self._skipped_base + self.skipped_per_epoch * self._epochs_begun

    @property
    def skipped_shards_total(self) -> int:
        return self._skipped_shards_base + self.skipped_shards_per_epoch * self._epochs_begun

    def _layout(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "rank": self.rank,
            "seed": self.seed,
            "shards": [Path(p).name for p in self.paths],
            "batch_size": self.batch_size,
            "views": [[size, list(scale)] for size, scale in self.views],
            "hflip": self.hflip,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def state_dict(self) -> dict[str, Any]:
        checkpoint = self._pipeline().checkpoint()
        if isinstance(checkpoint, str):
            checkpoint = checkpoint.encode("latin-1")
        return {
            "version": STATE_VERSION,
            **self._layout(),
            "checkpoint": base64.b64encode(checkpoint).decode("ascii"),
            "batches": self._batches,
            "start_batches": self._start_batches,
            "skipped_base": self._skipped_base,
            "skipped_total": self.skipped_total,
            "skipped_shards_base": self._skipped_shards_base,
            "skipped_shards_total": self.skipped_shards_total,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"data loader state version {state.get('version')!r} is not {STATE_VERSION} (a checkpoint of "
                f"another data.backend?)"
            )
        self._pipe = None
        self._batches = int(state["batches"])
        changed = [k for k in _LAYOUT_KEYS if state.get(k) != self._layout()[k]]
        if not changed:
            self._checkpoint = base64.b64decode(state["checkpoint"])
            self._start_batches = int(state["start_batches"])
            self._skipped_base = int(state["skipped_base"])
            self._skipped_shards_base = int(state.get("skipped_shards_base", 0))
            return
        log.warning(
            "DALI loader state does not match this loader (%s differ); restarting the pipeline from its first sample",
            ", ".join(changed),
        )
        self._checkpoint = None
        self._start_batches = self._batches
        self._skipped_base = int(state.get("skipped_total", 0))
        self._skipped_shards_base = int(state.get("skipped_shards_total", 0))

    @staticmethod
    def merge_states(states: list[Mapping[str, Any]]) -> dict[str, Any]:
        """One state for a job resumed at another world size: its layout differs, so it restarts the
        pipeline; the merged state carries the skip count of all ranks."""
        if not states:
            raise ValueError("no data loader states to merge")
        merged = dict(states[0])
        merged["skipped_total"] = sum(int(s.get("skipped_total", 0)) for s in states)
        merged["skipped_shards_total"] = sum(int(s.get("skipped_shards_total", 0)) for s in states)
        merged["world_size"] = -1  # never matches: the per-rank checkpoints do not carry over
        return merged

    # ------------------------------------------------------------------ batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        pipe = self._pipeline()
        while True:
            outputs = pipe.run()
            self._batches += 1
            yield self._to_batch(outputs)

    def _pipeline(self) -> Any:
        if self._pipe is None:
            self._pipe = self._build(self._checkpoint)
        return self._pipe

    def _build(self, checkpoint: bytes | None) -> Any:
        from nvidia.dali import fn, pipeline_def, types

        on_gpu = self.device.type == "cuda"
        device_id = None
        if on_gpu:
            device_id = self.device.index if self.device.index is not None else torch.cuda.current_device()
        decoder = "mixed" if on_gpu else "cpu"
        aspect = [3 / 4, 4 / 3]

        @pipeline_def(enable_checkpointing=True)
        def pipeline():
            encoded, labels = fn.readers.webdataset(
                paths=self.paths,
                index_paths=self.index_paths,
                ext=[";".join(DALI_IMAGE_EXTENSIONS), "cls"],
                missing_component_behavior="skip",
                random_shuffle=self.shuffle_buffer > 1,
                initial_fill=max(1, self.shuffle_buffer),
                shard_id=self.rank,
                num_shards=self.world_size,
                seed=derive_seed(self.seed, "dali-reader") % 2**31,
                name="reader",
            )
            keys = fn.get_property(encoded, key="source_info")
            if self.single:
                size, scale = self.views[0]
                images = fn.decoders.image_random_crop(
                    encoded, device=decoder, output_type=types.RGB, random_area=list(scale), random_aspect_ratio=aspect
                )
                crops = [fn.resize(images, size=[size, size], interp_type=types.INTERP_CUBIC, antialias=True)]
            else:
                images = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
                crops = [
                    fn.random_resized_crop(
                        images,
                        size=[size, size],
                        random_area=list(scale),
                        random_aspect_ratio=aspect,
                        interp_type=types.INTERP_CUBIC,
                        antialias=True,
                    )
                    for size, scale in self.views
                ]
            views = [
                fn.crop_mirror_normalize(
                    crop, mirror=fn.random.coin_flip(probability=self.hflip), dtype=types.UINT8, output_layout="CHW"
                )
                for crop in crops
            ]
            return (labels, keys, *views)

        options = {"checkpoint": checkpoint} if checkpoint is not None else {}
        pipe = pipeline(
            batch_size=self.batch_size,
            num_threads=self.num_threads,
            device_id=device_id,
            seed=derive_seed(self.seed, "dali", self.rank) % 2**31,
            **options,
        )
        pipe.build()
        return pipe

    def _to_batch(self, outputs: Sequence[Any]) -> dict[str, Any]:
        labels, keys, *views = outputs
        images = [_to_torch(view, self.device) for view in views]
        return {
            "image": images[0] if self.single else images,
            "label": torch.tensor([int(bytes(np.asarray(t)).decode("ascii")) for t in labels], dtype=torch.long),
            "key": [_key_of(bytes(np.asarray(t)).decode()) for t in keys],
        }


def _to_torch(tensors: Any, device: torch.device) -> torch.Tensor:
    """A dense DALI TensorList -> a torch tensor on the pipeline's device."""
    if device.type == "cpu":
        return torch.from_numpy(np.array(tensors.as_array()))
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = tensors.as_tensor()
    out = torch.empty(dense.shape(), dtype=torch.uint8, device=device)
    feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(device))
    return out


def _key_of(source_info: str) -> str:
    """'shard.tar:offset:key.ext' -> 'key'."""
    member = source_info.rsplit(":", 1)[-1]
    return member.rpartition("/")[2].partition(".")[0]


def _bad_items(
    indexes: Sequence[ShardIndex], expected: Mapping[str, int], rank: int, world_size: int
) -> tuple[int, int]:
    """This rank's share (shard i belongs to rank i % world_size) of the skipped samples (undecodable, and
    the unread rest of failed shards where the manifest gives their size) and of the failed shards."""
    samples = shards = 0
    for number, index in enumerate(indexes):
        if number % world_size != rank:
            continue
        samples += len(index.bad_samples)
        if index.failure or not index.samples:
            shards += 1
            read = len(index.samples) + len(index.bad_samples)
            samples += max(0, expected.get(index.url, read) - read)
    return samples, shards
