"""Finding, resuming or creating a job's MLflow run, and what the server already holds of it.

Shared by the delivery thread of a training process and by `pretrain tracking sync`, so both land in
the same run: the run id when known, else the run tagged with the job's key, else a new run tagged so.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from pretrain.tracking.store import local_artifact_location

logger = logging.getLogger("pretrain.tracking")

JOB_KEY_TAG = "pretrain.job_key"  # identifies one training job across restarts
# MLflow 3's UI opens an experiment without this tag in its GenAI view; this value selects model training
# (the UI's ExperimentKind CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(client: Any, tracking_uri: str, name: str) -> str:
    """The experiment's id, created (or restored) if needed."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            location = local_artifact_location(tracking_uri)
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_TAGS)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)  # another job created it first
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag, or by hand
        if key not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


def get_live_run(client: Any, run_id: str, tracking_uri: str, reopen: bool = True) -> Any:
    """The run, back in RUNNING state if `reopen`; None if it is gone (deleted, or unknown to this server)."""
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if err.get_http_status_code() != 404:
            raise
        run = None
    if run is None or run.info.lifecycle_stage == "deleted":
        logger.warning("tracking: run %s not found at %s; starting a new run", run_id, tracking_uri)
        return None
    if reopen and run.info.status != "RUNNING":
        client.update_run(run.info.run_id, status="RUNNING")
    return run


def find_job_run(client: Any, experiment: str, job_key: str) -> Any:
    """The run an earlier process of this job created (before any checkpoint recorded its id), or None."""
    runs = client.search_runs([experiment], filter_string=f"tags.`{JOB_KEY_TAG}` = '{job_key}'", max_results=1)
    return runs[0] if runs else None


def open_run(
    client: Any,
    tracking_uri: str,
    experiment: str,
    run_name: str,
    run_id: str | None,
    job_key: str | None,
    reopen: bool = True,
) -> tuple[Any, bool]:
    """(the job's run, whether it was created): by id, else by job key, else a new one tagged with the key."""
    run = get_live_run(client, run_id, tracking_uri, reopen) if run_id else None
    if run is None and job_key:
        found = find_job_run(client, experiment_id(client, tracking_uri, experiment), job_key)
        run = get_live_run(client, found.info.run_id, tracking_uri, reopen) if found is not None else None
    if run is not None:
        return run, False
    tags = {JOB_KEY_TAG: job_key} if job_key else None
    return client.create_run(experiment_id(client, tracking_uri, experiment), run_name=run_name, tags=tags), True


def known_points(client: Any, run: Any) -> set[tuple[str, int]]:
    """(key, step) of every metric point the server holds for the run: what must not be sent again."""
    run = client.get_run(run.info.run_id)  # current keys
    known: set[tuple[str, int]] = set()
    for key in run.data.metrics:
        known.update((m.key, int(m.step)) for m in client.get_metric_history(run.info.run_id, key))
    return known


def log_metric_best_effort(tracking_uri: str, run_id: str, key: str, value: float, step: int, timeout: float) -> bool:
    """Log one metric on an existing run (another job's: a fine-tune's score on its pretraining run) from a daemon
    thread, waiting at most `timeout` seconds, so an unreachable server never holds up or fails the caller.
    True when it was logged."""
    done: list[bool] = []

    def send() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).log_metric(run_id, key, value, step=step)
            done.append(True)
        except Exception as exc:  # any failure of the store or the network
            logger.warning("tracking: could not log %s on run %s at %s: %s", key, run_id, tracking_uri, exc)

    thread = threading.Thread(target=send, name="log-metric", daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(done)
