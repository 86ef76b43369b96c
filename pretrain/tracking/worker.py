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

from pretrain.tracking.local_record import IMAGES_DIR, Reconcile
from pretrain.tracking.outbox import Outbox, Upload
from pretrain.tracking.runs import EXPERIMENT_TAGS, JOB_KEY_TAG, known_points, open_run

__all__ = ["EXPERIMENT_TAGS", "JOB_KEY_TAG", "DeliveryWorker"]

logger = logging.getLogger("pretrain.tracking")

# MLflow's per-request limits. Params and tags go in separate calls: 100 params of 6000
# characters plus 100 tags of 8000 would exceed the 1 MB request cap.
_METRICS_PER_CALL = 1000
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
        local_dir: str | None = None,
        resume: Reconcile | None = None,
        on_run: Callable[[str], None] | None = None,
    ) -> None:
        """`local_dir`: keep pictures there (PNG) instead of a temp dir, for `pretrain tracking sync`.
        `resume`: reconcile with the run's history on first contact (see `Reconcile`). `on_run(run_id)`:
        called once the run exists."""
        self.outbox, self.tracking_uri, self.job_key = outbox, tracking_uri, job_key
        self.local_dir, self._reconcile, self._on_run = local_dir, resume, on_run
        self._already_sent: set[tuple[str, int]] = set()  # (key, step) the server has of steps to be re-run
        self.experiment, self.run_name, self.flush_interval = experiment, run_name, flush_interval
        self.run_id = resume_id
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
        run, _ = open_run(client, self.tracking_uri, self.experiment, self.run_name, self.run_id, self.job_key)
        if self._reconcile is not None:
            self._catch_up(client, run, self._reconcile)
            self._reconcile = None
        self._logged_params = dict(run.data.params)
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._client = client
        if self._on_run is not None:
            try:
                self._on_run(self.run_id)
            except Exception:
                logger.warning("tracking: recording the run id failed", exc_info=True)
        return client

    def _catch_up(self, client: Any, run: Any, reconcile: Reconcile) -> None:
        """A resumed job's first contact: queue (first) the points of steps up to the checkpoint that the
        server lacks (a killed process never sent them), and remember which points of the steps after it
        the server has, so their re-run does not log them twice."""
        known = known_points(client, run)
        missing = [p for p in reconcile.replay if (p.key, p.step) not in known]
        self._already_sent = {(key, step) for key, step in known if step > reconcile.step}
        if missing:
            self.outbox.requeue_metrics(list(missing))
            logger.info(
                "tracking: delivering %d metric points of steps up to %d that MLflow lacks",
                len(missing),
                reconcile.step,
            )

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
            if self._already_sent:
                chunk = [p for p in chunk if (p[0], p[3]) not in self._already_sent]
                if not chunk:
                    continue
            # A resent point keeps its timestamp, and the server ignores exact duplicates.
            self._log_batch(
                client,
                lambda chunk=chunk: self.outbox.requeue_metrics(chunk),
                metrics=[Metric(*point) for point in chunk],
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
            if self.local_dir is not None:  # kept: the run's own copy, and what `tracking sync` uploads
                directory, staged = os.path.join(self.local_dir, IMAGES_DIR), False
                os.makedirs(directory, exist_ok=True)
            else:
                self._staging = self._staging or tempfile.mkdtemp(prefix="pretrain-tracking-")
                directory, staged = self._staging, True
            path = os.path.join(directory, file_name)
            try:
                Image.fromarray(array).save(path)
            except Exception:
                logger.warning("tracking: could not write %s; dropping it", path, exc_info=True)
                continue
            with box.cond:
                box.uploads.append(Upload(path, IMAGES_DIR, staged=staged))

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
