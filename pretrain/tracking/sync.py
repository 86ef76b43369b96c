"""`pretrain tracking sync RUN_DIR`: deliver a run's local record to MLflow after the fact.

For a run whose tracking server was down (or never up): its params (config.json), tags, metric history
(metrics.jsonl), config artifact and pictures (tracking/images/) go into the job's own MLflow run (by id,
else by job key), or a new run tagged with the job key. What the server already has is left alone (a
metric point is identified by key and step), so a second sync adds nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pretrain.checkpoint import CheckpointManager, read_meta
from pretrain.config import UserError
from pretrain.runtime.run_lock import LOCK_FILE, holder_is_live, read_holder
from pretrain.tracking.local_record import (
    IMAGES_DIR,
    METRICS_FILE,
    TRACKING_DIR,
    read_points,
    read_run_file,
    update_run_file,
)
from pretrain.tracking.runs import known_points, open_run
from pretrain.tracking.store import resolve_tracking_uri
from pretrain.tracking.tracker import flatten_config

log = logging.getLogger("pretrain.tracking")

_BATCH = 1000  # MLflow's per-request limit for metrics
_PARAMS_BATCH = 100
_FINAL_STATUSES = ("FINISHED", "FAILED", "KILLED")


@dataclass
class SyncReport:
    run_id: str
    tracking_uri: str
    created: bool
    params: int = 0
    params_conflicting: int = 0
    tags: int = 0
    metrics: int = 0
    artifacts: int = 0
    status: str | None = None

    def summary(self) -> str:
        added = f"{self.params} params, {self.tags} tags, {self.metrics} metric points, {self.artifacts} artifacts"
        run = f"{'new ' if self.created else ''}run {self.run_id} at {self.tracking_uri}"
        extra = (
            f"; {self.params_conflicting} params already set to other values kept" if self.params_conflicting else ""
        )
        status = f"; status {self.status}" if self.status else ""
        return f"synced {run}: added {added}{extra}{status}"


def _job_identity(run_dir: Path) -> dict[str, Any]:
    """run id, job key, experiment and run name: tracking/run.json, else the latest checkpoint and config."""
    info = read_run_file(run_dir)
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    meta = read_meta(latest) if latest is not None else {}
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").is_file() else {}
    tracking = config.get("tracking", {})
    return {
        "run_id": info.get("run_id") or meta.get("mlflow_run_id"),
        "job_key": info.get("job_key") or meta.get("job_key"),
        "experiment": info.get("experiment") or tracking.get("experiment") or "pretrain",
        "run_name": info.get("run_name") or config.get("run", {}).get("name") or run_dir.name,
        "tracking_uri": info.get("tracking_uri") or tracking.get("uri") or "",
        "tags": info.get("tags", {}),
        "status": info.get("status"),
        "config": config,
    }


def sync_run(run_dir: str | os.PathLike[str], uri: str | None = None, force: bool = False) -> SyncReport:
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient

    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # the summary names the run
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file() and not (run_dir / "config.json").is_file():
        raise UserError(f"{run_dir} is not a run directory (no {METRICS_FILE} or config.json)")
    holder = read_holder(run_dir / LOCK_FILE)
    if holder is not None and holder_is_live(holder) is not False and not force:
        raise UserError(
            f"{run_dir} is in use by {holder.describe()}, whose tracker delivers its own record; "
            "sync when it has ended (or --force)"
        )
    job = _job_identity(run_dir)
    tracking_uri = uri or resolve_tracking_uri(job["tracking_uri"], run_dir)
    client = MlflowClient(tracking_uri=tracking_uri)
    run, created = open_run(
        client, tracking_uri, job["experiment"], job["run_name"], job["run_id"], job["job_key"], reopen=False
    )
    run_id = run.info.run_id
    report = SyncReport(run_id, tracking_uri, created)

    params = flatten_config(job["config"])
    have = run.data.params
    new = [Param(k, v) for k, v in params.items() if k not in have]
    report.params_conflicting = sum(1 for k, v in params.items() if k in have and have[k] != v)
    for i in range(0, len(new), _PARAMS_BATCH):
        client.log_batch(run_id, params=new[i : i + _PARAMS_BATCH], synchronous=True)
    report.params = len(new)

    tags = [RunTag(k, str(v)) for k, v in job["tags"].items() if run.data.tags.get(k) != str(v)]
    if tags:
        client.log_batch(run_id, tags=tags, synchronous=True)
    report.tags = len(tags)

    known = known_points(client, run)
    points, seen = [], set(known)
    for point in read_points(run_dir / METRICS_FILE):
        if (point.key, point.step) not in seen:  # a line logged twice locally is sent once
            seen.add((point.key, point.step))
            points.append(Metric(*point))
    for i in range(0, len(points), _BATCH):
        client.log_batch(run_id, metrics=points[i : i + _BATCH], synchronous=True)
    report.metrics = len(points)

    report.artifacts = _sync_artifacts(client, run_id, run_dir)

    status = job["status"]
    if status in _FINAL_STATUSES and run.info.status != status:
        client.set_terminated(run_id, status)
        report.status = status
    update_run_file(run_dir, run_id=run_id, tracking_uri=tracking_uri)
    return report


def _sync_artifacts(client: Any, run_id: str, run_dir: Path) -> int:
    """config.json at the root and the pictures under images/, each uploaded once."""
    wanted = []
    if (run_dir / "config.json").is_file():
        wanted.append((run_dir / "config.json", None))
    images = run_dir / TRACKING_DIR / IMAGES_DIR
    if images.is_dir():
        wanted += [(p, IMAGES_DIR) for p in sorted(images.glob("*.png"))]
    present = {a.path for a in client.list_artifacts(run_id)}
    if any(folder == IMAGES_DIR for _, folder in wanted):
        present |= {a.path for a in client.list_artifacts(run_id, IMAGES_DIR)}
    uploaded = 0
    for path, folder in wanted:
        name = f"{folder}/{path.name}" if folder else path.name
        if name not in present:
            client.log_artifact(run_id, str(path), folder)
            uploaded += 1
    return uploaded


def cmd_sync(args: argparse.Namespace) -> int:
    report = sync_run(args.run_dir, uri=args.uri, force=args.force)
    print(report.summary())
    return 0


def register(subparsers: Any) -> None:
    tracking = subparsers.add_parser("tracking", help="experiment tracking tools")
    commands = tracking.add_subparsers(dest="tracking_command", required=True)
    sync = commands.add_parser(
        "sync",
        help="deliver a run's local record (metrics.jsonl, params, tags, pictures) to MLflow; idempotent",
    )
    sync.add_argument("run_dir", help="the run directory (run.output_dir/run.name)")
    sync.add_argument("--uri", help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else the run's own)")
    sync.add_argument("--force", action="store_true", help="sync even though a process holds the run's lock")
    sync.set_defaults(func=cmd_sync)
