"""Sharded checkpoints in the torch.distributed.checkpoint (DCP) format, written atomically.

Layout of a run's checkpoint directory:

    checkpoints/
      step_00001000/          one complete checkpoint
        .metadata, *.distcp   DCP shards: model and optimizer tensors (any world size can load them)
        rank_00000.pt         per-rank state: RNG, data-stream position, scheduler
        meta.json             step, config, engine, world size, MLflow run id; written last
      latest                  name of the newest complete checkpoint

A checkpoint is written into `.tmp-step_XXXXXXXX` and renamed into place only when every file
is on disk, so a process killed mid-write leaves the previous checkpoint untouched and loadable.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from pretrain.config import ConfigError, UserError
from pretrain.distributed import gather_floats

log = logging.getLogger("pretrain.checkpoint")

META_FILE = "meta.json"
LATEST_FILE = "latest"
FORMAT_VERSION = 1


# Less free space than this (or than the previous checkpoint's size) after a failed write: the disk is full.
_FULL_BELOW = 1 << 20


class CheckpointDiskFullError(UserError):
    """A checkpoint could not be written for lack of space; the previous one is intact."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


def _out_of_space(exc: BaseException, directory: Path, needed: int) -> bool:
    """The write failed for lack of space: ENOSPC/EDQUOT anywhere in the chain, or less free space left than
    a checkpoint needs (torch's writer reports a short write as "unexpected pos", and DCP wraps it)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        seen = seen.__cause__ or seen.__context__
    if "No space left on device" in str(exc):
        return True
    try:
        return shutil.disk_usage(directory).free < max(_FULL_BELOW, needed)
    except OSError:
        return False


def _rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def _quiet_dcp():
    # Single-process DCP warns on every call that no process group exists; that is intended here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def is_complete(path: Path) -> bool:
    """A checkpoint counts only if meta.json (written last), every rank's file and, for the DCP
    format, DCP's metadata are there."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("format", "dcp") == "dcp" and not (path / ".metadata").is_file():
        return False
    return all((path / _rank_file(r)).is_file() for r in range(meta.get("world_size", 1)))


def read_meta(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / META_FILE).read_text())


def publish(tmp: Path, final: Path, meta: dict[str, Any]) -> None:
    """Make the fully written directory `tmp` the checkpoint `final`: meta.json goes in last, then one
    rename. A reader sees the old checkpoint or the new one, never a partial one. An existing `final`
    (a step re-saved after a resume) is replaced."""
    _write_atomic(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
    if final.exists():
        stale = final.with_name(f".stale-{final.name}")
        os.replace(final, stale)
        shutil.rmtree(stale)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


class CheckpointManager:
    """Saves, finds and prunes the checkpoints of one run."""

    def __init__(self, root: str | Path, keep_last: int = 3, rank: int = 0, world_size: int = 1):
        self.root = Path(root)
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self._pending: tuple | None = None  # a background write not yet published

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # ------------------------------------------------------------------ save

    def save(
        self,
        step: int,
        write_tensors: Callable[[Path], None],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        checkpoint_format: str = "dcp",
    ) -> Path:
        """Write a complete checkpoint for `step` and make it the latest. Returns its directory.

        `write_tensors(directory)` writes the model/optimizer state (every rank calls it)."""
        self.wait()
        start = time.perf_counter()
        with self._cleaned_up_on_failure(step):
            tmp = self._begin(step, rank_state)
            write_tensors(tmp)
            return self._finish(step, tmp, meta, checkpoint_format, start)

    def save_async(
        self,
        step: int,
        start_write: Callable[[Path], Future],
        rank_state: dict[str, Any],
        meta: dict[str, Any],
        checkpoint_format: str = "dcp",
    ) -> None:
        """Like `save`, but the tensors are written in the background: `start_write(directory)` returns
        once the state is staged in memory, with a future for the write. The checkpoint becomes
        visible (renamed into place, `latest` updated) at the first `poll()` after every rank's write
        has finished; until then the previous checkpoint stays the latest."""
        self.wait()
        start = time.perf_counter()
        with self._cleaned_up_on_failure(step):
            tmp = self._begin(step, rank_state)
            self._pending = (step, tmp, start_write(tmp), meta, checkpoint_format, start)

    def poll(self) -> Path | None:
        """Publish a background checkpoint if every rank has finished writing it (a collective)."""
        if self._pending is None:
            return None
        done = self._pending[2].done()
        if all(flags[0] for flags in gather_floats([float(done)])):
            return self.wait()
        return None

    def wait(self) -> Path | None:
        """Block until a background checkpoint is written, then publish it (a collective)."""
        if self._pending is None:
            return None
        step, tmp, future, meta, checkpoint_format, start = self._pending
        self._pending = None
        with self._cleaned_up_on_failure(step):
            future.result()  # re-raises a failed write: the previous checkpoint stays the latest
            return self._finish(step, tmp, meta, checkpoint_format, start)

    @contextlib.contextmanager
    def _cleaned_up_on_failure(self, step: int):
        """A failed write leaves no partial directory, and a full disk says so in one message."""
        previous = self.latest()
        try:
            yield
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # DCP's CheckpointException derives from BaseException
            full = _out_of_space(exc, self.root, _size(previous) if previous is not None else 0)
            free = shutil.disk_usage(self.root).free if self.root.is_dir() else 0
            if self.rank == 0:
                shutil.rmtree(self.root / f".tmp-step_{step:08d}", ignore_errors=True)
            if not full:
                raise
            kept = (
                f"the previous checkpoint {previous} is intact and `latest` names it; free space, then run the "
                "same command again: train.resume=auto continues from it"
                if previous is not None
                else "there is no earlier checkpoint; free space and start again"
            )
            raise CheckpointDiskFullError(
                f"disk full: checkpoint step {step} could not be written to {self.root} ({_human(free)} free); "
                f"the partial write was removed; {kept}"
            ) from exc

    def check_space(self, step: int) -> None:
        """Warn before writing when the previous checkpoint would not fit in the free space."""
        previous = self.latest()
        if self.rank != 0 or previous is None:
            return
        needed, free = _size(previous), shutil.disk_usage(self.root).free
        if free < needed:
            log.warning(
                "checkpoint step %d may not fit: %s free in %s, the previous checkpoint took %s",
                step,
                _human(free),
                self.root,
                _human(needed),
            )

    def _begin(self, step: int, rank_state: dict[str, Any]) -> Path:
        tmp = self.root / f".tmp-step_{step:08d}"
        self.check_space(step)
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".tmp-step_*"):  # from a process killed mid-write
                shutil.rmtree(leftover)
            tmp.mkdir()
        self._barrier()
        with open(tmp / _rank_file(self.rank), "wb") as f:
            torch.save(rank_state, f)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def _finish(self, step: int, tmp: Path, meta: dict[str, Any], checkpoint_format: str, start: float) -> Path:
        final = self.step_dir(step)
        self._barrier()
        if self.rank == 0:
            full_meta = {
                "format_version": FORMAT_VERSION,
                "step": step,
                "world_size": self.world_size,
                "format": checkpoint_format,
                "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                **meta,
            }
            publish(tmp, final, full_meta)
            _write_atomic(self.root / LATEST_FILE, final.name + "\n")
            self._prune(step)
            log.info("checkpoint step %d written to %s in %.2fs", step, final, time.perf_counter() - start)
        self._barrier()
        return final

    def _prune(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `step`, the one just written. Later steps are an earlier
        run's, which a fresh run (train.resume=none) in the same directory must not count: by step order they
        would push out the checkpoint just written."""
        complete = [path for path in self.list() if read_meta(path)["step"] <= step]
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def _barrier(self) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()

    # ------------------------------------------------------------------ find

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step_*") if p.is_dir() and is_complete(p)]
        return sorted(found, key=lambda p: read_meta(p)["step"])

    def latest(self) -> Path | None:
        """The checkpoint named by `latest` if it is complete, else the newest complete one."""
        marker = self.root / LATEST_FILE
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if is_complete(named):
                return named
            log.warning("'latest' names %s, which is incomplete; falling back to the newest complete checkpoint", named)
        complete = self.list()
        return complete[-1] if complete else None


def resolve_resume(spec: str, manager: CheckpointManager) -> Path | None:
    """`auto`: the latest good checkpoint of this run if any; `none`: start fresh; else a path."""
    if spec == "none":
        return None
    if spec == "auto":
        return manager.latest()
    try:
        return find_checkpoint(spec)
    except FileNotFoundError as exc:
        raise ConfigError(f"train.resume: {exc}") from None


def find_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint at `path`, or the latest one under a run or checkpoints directory.

    Raises FileNotFoundError naming `path` (and what is missing) when there is none."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint directory")
    if is_complete(path):
        return path
    for root in (path / "checkpoints", path):
        found = CheckpointManager(root).latest()
        if found is not None:
            return found
    if (path / ".metadata").is_file() or (path / META_FILE).is_file():
        missing = [name for name in (META_FILE, ".metadata", _rank_file(0)) if not (path / name).is_file()]
        detail = f"missing {', '.join(missing)}" if missing else "meta.json unreadable or a rank file missing"
        raise FileNotFoundError(f"{path} is an incomplete checkpoint ({detail})")
    raise FileNotFoundError(
        f"no complete checkpoint at or under {path} (expected meta.json and .metadata in a step_XXXXXXXX "
        "directory, or a run/checkpoints directory holding one)"
    )


def dcp_save(tensors: dict[str, Any], path: Path) -> None:
    with _quiet_dcp():
        dcp.save(tensors, checkpoint_id=str(path))


def dcp_async_save(tensors: dict[str, Any], path: Path, process_group=None) -> Future:
    with _quiet_dcp():
        response = dcp.async_save(
            tensors,
            checkpoint_id=str(path),
            process_group=process_group,
            no_dist=not torch.distributed.is_initialized(),
        )
    return getattr(response, "upload_completion", response)  # a Future, or an AsyncSaveResponse holding one


def dcp_load(tensors: dict[str, Any], path: Path) -> None:
    """Fill `tensors` (a state dict of the current, possibly sharded, model) in place from `path`."""
    with _quiet_dcp():
        dcp.load(tensors, checkpoint_id=str(path))


def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
    """This rank's RNG/data state, or None when the checkpoint was written by fewer ranks."""
    file = Path(path) / _rank_file(rank)
    if not file.is_file():
        return None
    return torch.load(file, map_location="cpu", weights_only=False)
