"""The daemon thread that owns every MLflow call of one run.

It sends at most every `flush_interval` seconds, or at once when flush()/close() wait. A
failed pass puts its batch back and retries with exponential backoff (1 s up to 30 s; at
most 1 s while someone waits), warning once per outage.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from pretrain.tracking.outbox import Outbox, Upload
from pretrain.tracking.store import local_artifact_location

logger = logging.getLogger("pretrain.tracking")

# MLflow's per-request limits. Params and tags go in separate calls: 100 params of 6000
# characters plus 100 tags of 8000 would exceed the 1 MB request cap.
_METRICS_PER_CALL = 1000
JOB_KEY_TAG = "pretrain.job_key"  # identifies one training job across restarts
# MLflow 3's UI opens an experiment without this tag in its GenAI view; this value selects model training
# (the UI's ExperimentKind CUSTOM_MODEL_DEVELOPMENT).
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}
_PARAMS_PER_CALL = 100
_MAX_BACKOFF_S = 30.0
_URGENT_RETRY_S = 1.0


def _is_permanent(err: Exception) -> bool:
    """A request MLflow rejected as invalid fails the same way on every retry."""
    from mlflow.exceptions import MlflowException

    if not isinstance(err, MlflowException):
        return False
    code = err.get_http_status_code()
    return 400 <= code < 500 and code not in (408, 429)


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class DeliveryWorker:
    """Delivers an Outbox to one MLflow run, creating or resuming the run on first contact."""

    def __init__(
        self,
        outbox: Outbox,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        resume_id: str | None,
        flush_interval: float,
        job_key: str | None = None,
    ) -> None:
        self.outbox, self.tracking_uri, self.job_key = outbox, tracking_uri, job_key
        self.experiment, self.run_name, self.flush_interval = experiment, run_name, flush_interval
        self.run_id = self._resume_id = resume_id
        self.experiment_id: str | None = None
        self._client: Any = None  # set once the run exists
        self._logged_params: dict[str, str] = {}
        self._flush_waiters = 0
        self._closing = self._abandoned = self._exited = False
        self._end_status = "FINISHED"
        self._failures = 0
        self._last_attempt = float("-inf")
        self._staging: str | None = None
        self._thread = threading.Thread(target=self._loop, name="mlflow-tracker", daemon=True)
        self._thread.start()

    def flush(self, timeout: float | None) -> bool:
        cond = self.outbox.cond
        with cond:
            self._flush_waiters += 1
            cond.notify_all()
            try:
                cond.wait_for(lambda: self.outbox.drained() or self._abandoned or self._exited, timeout)
                return self.outbox.drained()
            finally:
                self._flush_waiters -= 1

    def stop(self, timeout: float, status: str) -> bool:
        """Deliver everything, end the run; False if that didn't finish within `timeout`."""
        with self.outbox.cond:
            if not self._closing:
                self._closing, self._end_status = True, status
            self.outbox.cond.notify_all()
        self._thread.join(timeout)
        if not self._thread.is_alive():
            return True
        with self.outbox.cond:
            self._abandoned = True  # the thread exits after its current request
            self.outbox.cond.notify_all()
        return False

    def _seconds_until_due(self) -> float:
        if self._abandoned:
            return 0.0
        if self.outbox.drained() and not self._closing:
            return max(self.flush_interval, 0.1)  # idle; flush() and stop() notify
        urgent = self._closing or self._flush_waiters > 0
        if self._failures:
            backoff = min(_MAX_BACKOFF_S, 2.0 ** (self._failures - 1))
            delay = min(backoff, _URGENT_RETRY_S) if urgent else backoff
        else:
            delay = 0.0 if urgent else self.flush_interval
        return self._last_attempt + delay - time.monotonic()

    def _loop(self) -> None:
        cond, finished = self.outbox.cond, False
        while not finished:
            with cond:
                while (wait := self._seconds_until_due()) > 0:
                    cond.wait(wait)
                if self._abandoned:
                    break
                self.outbox.sending = True
            try:
                self._stage_images()
                finished = self._send_pass()
            except Exception as err:  # anything, so the thread outlives any outage or bug
                self._failures += 1
                if self._failures == 1:
                    logger.warning(
                        "tracking: cannot reach MLflow at %s (%s); keeping data queued and retrying in the background",
                        self.tracking_uri,
                        err,
                    )
            else:
                if self._failures:
                    logger.info("tracking: MLflow at %s is back; backlog delivered", self.tracking_uri)
                self._failures = 0
            with cond:
                self.outbox.sending = False
                self._last_attempt = time.monotonic()
                cond.notify_all()
        self._remove_staging()
        with cond:
            self._exited = True  # nothing will be sent any more: release flush() callers
            cond.notify_all()

    def _send_pass(self) -> bool:
        """Deliver what is queued; True once the run has been ended and the thread may exit."""
        with self.outbox.cond:
            if self._closing and self._client is None and not self.outbox.has_data():
                return True  # nothing was ever logged: don't create an empty run
        client = self._ensure_run()
        self._send_params_and_tags(client)
        self._send_metrics(client)
        self._send_uploads(client)
        with self.outbox.cond:
            if not self._closing or self.outbox.has_data():
                return False
        client.set_terminated(self.run_id, self._end_status)
        return True

    def _ensure_run(self) -> Any:
        if self._client is not None:
            return self._client
        from mlflow.tracking import MlflowClient  # built here: a store may contact its server

        client = MlflowClient(tracking_uri=self.tracking_uri)
        run = self._resume(client) if self._resume_id else None
        if run is None and self.job_key:
            run = self._find_job_run(client)
        if run is None:
            tags = {JOB_KEY_TAG: self.job_key} if self.job_key else None
            run = client.create_run(self._experiment(client), run_name=self.run_name, tags=tags)
        self._logged_params = dict(run.data.params)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._client = client
        return client

    def _resume(self, client: Any) -> Any:
        """Continue the saved run, back in RUNNING state; None if it is gone."""
        from mlflow.exceptions import MlflowException

        try:
            run = client.get_run(self._resume_id)
        except MlflowException as err:
            if err.get_http_status_code() != 404:
                raise
            run = None
        if run is None or run.info.lifecycle_stage == "deleted":
            logger.warning("tracking: run %s not found at %s; starting a new run", self._resume_id, self.tracking_uri)
            self._resume_id = self.run_id = None
            return None
        if run.info.status != "RUNNING":
            client.update_run(run.info.run_id, status="RUNNING")
        return run

    def _find_job_run(self, client: Any) -> Any:
        """The run an earlier process of this job created before any checkpoint recorded its id."""
        runs = client.search_runs(
            [self._experiment(client)], filter_string=f"tags.`{JOB_KEY_TAG}` = '{self.job_key}'", max_results=1
        )
        if not runs:
            return None
        self._resume_id = runs[0].info.run_id
        return self._resume(client)

    def _experiment(self, client: Any) -> str:
        from mlflow.exceptions import MlflowException

        exp = client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                location = local_artifact_location(self.tracking_uri)
                return client.create_experiment(self.experiment, artifact_location=location, tags=EXPERIMENT_TAGS)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = client.get_experiment_by_name(self.experiment)  # another job created it first
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        for key, value in EXPERIMENT_TAGS.items():  # experiments made before the tag, or by hand
            if key not in exp.tags:
                client.set_experiment_tag(exp.experiment_id, key, value)
        return exp.experiment_id

    def _deliver(self, send: Callable[[], None], requeue: Callable[[], None], what: str) -> None:
        """A transient failure requeues and propagates (the pass is retried); a rejection drops."""
        try:
            send()
        except Exception as err:
            if not _is_permanent(err):
                requeue()
                raise
            logger.warning("tracking: MLflow rejected %s; dropping it: %s", what, err)

    def _log_batch(self, client: Any, requeue: Callable[[], None], **entities: list) -> None:
        # synchronous=True: MLFLOW_ENABLE_ASYNC_LOGGING would otherwise hide failures from us.
        ((kind, batch),) = entities.items()
        send = functools.partial(client.log_batch, self.run_id, **entities, synchronous=True)
        self._deliver(send, requeue, f"{len(batch)} {kind}")

    def _send_params_and_tags(self, client: Any) -> None:
        from mlflow.entities import Param, RunTag

        box = self.outbox
        with box.cond:
            params, box.params = box.params, {}
            tags, box.tags = box.tags, {}

        def requeue() -> None:  # values logged again since they were taken out are newer
            with box.cond:
                box.params, box.tags = {**params, **box.params}, {**tags, **box.tags}

        new = {}
        for key, value in params.items():
            old = self._logged_params.get(key)
            if old is None:
                new[key] = value
            elif old != value:  # MLflow forbids changing a param, e.g. on resume with an edited config
                logger.warning("tracking: param %r is already %r in this run; not logging %r", key, old, value)
        for chunk in _chunks(list(new.items()), _PARAMS_PER_CALL):
            self._log_batch(client, requeue, params=[Param(k, v) for k, v in chunk])
            self._logged_params.update(chunk)
        for chunk in _chunks(list(tags.items()), _PARAMS_PER_CALL):
            self._log_batch(client, requeue, tags=[RunTag(k, v) for k, v in chunk])

    def _send_metrics(self, client: Any) -> None:
        from mlflow.entities import Metric

        with self.outbox.cond:
            remaining = len(self.outbox.metrics)  # bounded, so a fast producer can't starve the rest
        while remaining > 0 and (chunk := self.outbox.take_metrics(min(remaining, _METRICS_PER_CALL))):
            remaining -= len(chunk)
            # A resent point keeps its timestamp, and the server ignores exact duplicates.
            self._log_batch(
                client, lambda: self.outbox.requeue_metrics(chunk), metrics=[Metric(*point) for point in chunk]
            )

    def _stage_images(self) -> None:
        """Encode queued images to disk even while offline, so pixels don't pile up in RAM."""
        from PIL import Image

        box = self.outbox
        while True:
            with box.cond:
                if not box.images:
                    return
                array, file_name = box.images.popleft()
            self._staging = self._staging or tempfile.mkdtemp(prefix="pretrain-tracking-")
            path = os.path.join(self._staging, file_name)
            try:
                Image.fromarray(array).save(path)
            except Exception:
                logger.warning("tracking: could not write %s; dropping it", path, exc_info=True)
                continue
            with box.cond:
                box.uploads.append(Upload(path, "images", staged=True))

    def _send_uploads(self, client: Any) -> None:
        box = self.outbox
        with box.cond:
            pending = len(box.uploads)  # only this thread removes uploads
        for _ in range(pending):
            with box.cond:
                upload = box.uploads.popleft()
            if not os.path.isfile(upload.local_path):
                logger.warning("tracking: artifact %s no longer exists; skipping it", upload.local_path)
                continue

            def requeue(upload: Upload = upload) -> None:
                with box.cond:
                    box.uploads.appendleft(upload)

            self._deliver(
                lambda upload=upload: client.log_artifact(self.run_id, upload.local_path, upload.artifact_dir),
                requeue,
                f"artifact {upload.local_path}",
            )
            if upload.staged:
                with contextlib.suppress(OSError):
                    os.remove(upload.local_path)
        self._remove_staging()  # all staged files are uploaded: don't leave a temp dir behind a kill

    def _remove_staging(self) -> None:
        if self._staging:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None
