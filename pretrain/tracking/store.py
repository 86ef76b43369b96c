"""Where runs are stored and how to look at them."""

from __future__ import annotations

import os
from pathlib import Path


def local_tracking_uri(run_dir: str | os.PathLike[str]) -> str:
    """A server-less store inside the run directory, so a laptop run needs no setup."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def resolve_tracking_uri(configured: str, run_dir: str | os.PathLike[str]) -> str:
    """The environment wins so a cluster can redirect every job without editing configs."""
    return os.environ.get("MLFLOW_TRACKING_URI") or configured or local_tracking_uri(run_dir)


def local_artifact_location(tracking_uri: str) -> str | None:
    """Keep a sqlite store's artifacts next to its database, not in the process's cwd."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return str(Path(tracking_uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")


def ui_hint(tracking_uri: str, experiment_id: str | None, run_id: str | None) -> str:
    """A URL for a server, the command that serves the UI for anything else."""
    if tracking_uri.startswith(("http://", "https://")):
        base = tracking_uri.rstrip("/")
        if experiment_id and run_id:
            return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
        return base
    return f"mlflow ui --backend-store-uri {tracking_uri}"
