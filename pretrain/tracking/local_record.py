"""The run's own record of what it tracked, on disk in the run directory, needing no server.

`metrics.jsonl` holds one line per logged step, `{"step": s, "time": ms, name: value, ...}`. It is the
durable outbox of the MLflow metrics: fsynced before every checkpoint is published, trimmed to the
checkpoint's step on resume (the steps after it are re-run), replayed to MLflow for what the server
lacks, and the source of `pretrain tracking sync`. `tracking/run.json` says which MLflow run the record
belongs to (run id once known, job key, experiment, tags, final status); pictures are kept as PNGs in
`tracking/images/`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

log = logging.getLogger("pretrain.tracking")

METRICS_FILE = "metrics.jsonl"
TRACKING_DIR = "tracking"
RUN_FILE = "run.json"
IMAGES_DIR = "images"


class MetricPoint(NamedTuple):
    key: str
    value: float
    timestamp: int  # ms
    step: int


@dataclass
class Reconcile:
    """What a resumed run owes MLflow: points of steps up to `step` the server may lack (`replay`), and
    the rule that steps after `step` are re-run, so points the server already has for them are not sent again."""

    step: int
    replay: list[MetricPoint] = field(default_factory=list)


def _points(record: Mapping[str, Any], fallback_ms: int) -> list[MetricPoint]:
    step, stamp = int(record["step"]), int(record.get("time", fallback_ms))
    return [
        MetricPoint(k, float(v), stamp, step)
        for k, v in record.items()
        if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)
    ]


def read_records(path: Path) -> list[dict[str, Any]]:
    """The lines of a metrics.jsonl; a torn last line (a kill mid-write) is dropped."""
    if not path.is_file():
        return []
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s:%d: unreadable line dropped", path, number)
    return [r for r in records if isinstance(r, dict) and "step" in r]


def read_points(path: Path) -> list[MetricPoint]:
    fallback = int(path.stat().st_mtime * 1000) if path.is_file() else 0
    return [p for record in read_records(path) for p in _points(record, fallback)]


class MetricsLog:
    """metrics.jsonl, written by rank 0 only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = None
        self._warned = False

    def append(self, step: int, metrics: Mapping[str, float]) -> None:
        record = {"step": step, "time": int(time.time() * 1000)}
        record.update(metrics)
        try:
            if self._file is None:
                self._file = open(self.path, "a")  # noqa: SIM115 -- held for the run, closed by close()
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as exc:  # a full disk: the checkpoint that follows reports it; MLflow still gets the points
            self._write_failed(exc)

    def sync(self) -> None:
        """Make every line written so far durable (before a checkpoint that covers them is published)."""
        if self._file is not None:
            try:
                os.fsync(self._file.fileno())
            except OSError as exc:
                self._write_failed(exc)

    def _write_failed(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            log.warning("%s: cannot write (%s); its lines are lost from the local record", self.path, exc.strerror)
        self.close()

    def truncate_after(self, step: int) -> list[MetricPoint]:
        """Drop lines of steps after `step` (they will be re-run and logged again) and return the points
        that remain. Atomic: a kill leaves the old file or the new one."""
        self.close()
        records = read_records(self.path)
        kept = [r for r in records if int(r["step"]) <= step]
        if len(kept) != len(records):
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            log.info("%s: dropped %d lines of steps after %d (re-run now)", self.path, len(records) - len(kept), step)
        fallback = int(self.path.stat().st_mtime * 1000) if self.path.is_file() else 0
        return [p for r in kept for p in _points(r, fallback)]

    def close(self) -> None:
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # the flush of a full disk's last bytes
                pass


def read_run_file(run_dir: Path) -> dict[str, Any]:
    path = run_dir / TRACKING_DIR / RUN_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


_run_file_lock = threading.Lock()  # the training thread and the delivery thread both update it


def update_run_file(run_dir: Path, **fields: Any) -> None:
    """Merge `fields` (None values left out) into tracking/run.json, atomically."""
    path = run_dir / TRACKING_DIR / RUN_FILE
    with _run_file_lock:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = {**read_run_file(run_dir), **{k: v for k, v in fields.items() if v is not None}}
        tmp = path.with_name(f".{RUN_FILE}.tmp")
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
