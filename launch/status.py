"""`pretrain status RUN_DIR`: where a run stands, from its files and, when reachable, SLURM and MLflow.

Every external question is best effort with a short timeout: a login node without SLURM, or an
MLflow server that is down, gives "unknown", never an error.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from launch.slurm import RECORD_NAME, slurm_dir
from pretrain.checkpoint import CheckpointManager, read_meta
from pretrain.runtime.run_lock import LOCK_FILE, holder_is_live, read_holder
from pretrain.tracking.local_record import read_run_file
from pretrain.tracking.store import resolve_tracking_uri, ui_hint

UNKNOWN = "unknown"


def _query(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def slurm_job_state(job_id: str) -> tuple[str, str]:
    """(state, where it came from): squeue for queued/running jobs, then sacct, then scontrol."""
    if state := _query(["squeue", "-h", "-j", job_id, "-o", "%T"]):
        return state, "squeue"
    if state := _query(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        return state.splitlines()[0].strip(), "sacct"
    if shown := _query(["scontrol", "show", "job", job_id]):
        for field in shown.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1], "scontrol"
    return UNKNOWN, "SLURM not reachable or the job is no longer known"


def _last_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    lines = path.read_text().splitlines()
    return json.loads(lines[-1]) if lines else None


def _find_run(tracking_uri: str, run_id: str | None, job_key: str | None) -> tuple[str | None, str | None]:
    """(run id, experiment id) from the tracking store: by the checkpoint's run id, or by the job key
    when the checkpoint was written before the tracker had created the run. Short timeout, no retries."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    try:
        from mlflow.tracking import MlflowClient

        from pretrain.tracking.worker import JOB_KEY_TAG

        client = MlflowClient(tracking_uri)
        if run_id:
            return run_id, client.get_run(run_id).info.experiment_id
        if job_key:
            experiments = [e.experiment_id for e in client.search_experiments()]
            found = client.search_runs(experiments, filter_string=f"tags.`{JOB_KEY_TAG}` = '{job_key}'", max_results=1)
            if found:
                return found[0].info.run_id, found[0].info.experiment_id
    except Exception:
        pass
    return run_id, None


def _lock_state(run_dir: Path) -> str:
    """Who holds the run directory's lock, and whether that process is alive (when this host can tell)."""
    try:
        holder = read_holder(run_dir / LOCK_FILE)
    except Exception as exc:  # an unreadable lock: say so, never fail the status
        return f"unreadable ({exc})"
    if holder is None:
        return "free"
    live = {True: "running", False: "gone: a stale lock, taken over by the next start", None: "on another host"}
    return f"held by {holder.describe()} ({live[holder_is_live(holder)]})"


def run_status(run_dir: str | Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    status: dict[str, Any] = {"run_dir": str(run_dir.resolve())}
    latest = CheckpointManager(run_dir / "checkpoints").latest()
    meta = read_meta(latest) if latest else {}
    status["checkpoint"] = str(latest) if latest else None
    status["checkpoint_step"] = meta.get("step")
    status["train_steps"] = meta.get("config", {}).get("train", {}).get("steps")
    metrics = _last_metrics(run_dir)
    status["last_logged_step"] = metrics["step"] if metrics else None
    status["last_loss"] = metrics.get("loss") if metrics else None

    status["lock"] = _lock_state(run_dir)
    run_id = meta.get("mlflow_run_id") or read_run_file(run_dir).get("run_id")
    config_file = run_dir / "config.json"
    saved = meta.get("config") or (json.loads(config_file.read_text()) if config_file.is_file() else {})
    tracking_uri = resolve_tracking_uri(saved.get("tracking", {}).get("uri", ""), run_dir)
    tracked = saved.get("tracking", {}).get("enabled", True)
    local_db = tracking_uri.removeprefix("sqlite:///") if tracking_uri.startswith("sqlite:///") else None
    if tracked and (run_id or meta.get("job_key")) and (local_db is None or Path(local_db).is_file()):
        run_id, experiment_id = _find_run(tracking_uri, run_id, meta.get("job_key"))
    else:
        experiment_id = None
    status["mlflow_run_id"] = run_id
    status["mlflow_ui"] = ui_hint(tracking_uri, experiment_id, run_id)

    record_file = slurm_dir(run_dir) / RECORD_NAME
    if record_file.is_file():
        record = json.loads(record_file.read_text())
        state, source = slurm_job_state(record["job_id"])
        status["slurm"] = {**record, "state": state, "state_from": source}
    else:
        status["slurm"] = None
    return status


def format_status(status: dict[str, Any]) -> str:
    step = status["checkpoint_step"]
    of = f" of {status['train_steps']}" if status["train_steps"] else ""
    lines = [
        f"run              {status['run_dir']}",
        f"checkpoint       {status['checkpoint'] or 'none yet'}" + (f" (step {step}{of})" if step is not None else ""),
        f"last logged step {status['last_logged_step'] if status['last_logged_step'] is not None else 'none'}"
        + (f", loss {status['last_loss']:.4f}" if status["last_loss"] is not None else ""),
        f"lock             {status['lock']}",
        f"mlflow run       {status['mlflow_run_id'] or UNKNOWN}",
        f"mlflow ui        {status['mlflow_ui']}",
    ]
    slurm = status["slurm"]
    if slurm is None:
        lines.append("slurm job        none submitted from this run directory")
    else:
        lines.append(f"slurm job        {slurm['job_id']}: {slurm['state']} ({slurm['state_from']})")
        lines.append(f"slurm output     {slurm['output']}")
    return "\n".join(lines)
