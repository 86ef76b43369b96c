"""The training loop's handle on an MLflow run: every method returns at memory speed."""

from __future__ import annotations

import functools
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from pretrain.tracking.local_record import Reconcile
from pretrain.tracking.outbox import (
    MAX_KEY_LEN,
    MAX_PARAM_LEN,
    MAX_TAG_LEN,
    Outbox,
    Upload,
    is_valid_key,
)
from pretrain.tracking.store import ui_hint
from pretrain.tracking.worker import DeliveryWorker

logger = logging.getLogger("pretrain.tracking")

_UNSAFE_FILE_CHARS = re.compile(r"[^\w.-]")

# Read by mlflow at request time. Its defaults (7 retries with exponential backoff, 120 s
# timeout) hold the worker for minutes per request on a dead server; the worker retries on
# its own schedule instead. The run-URL banner costs an extra request and prints to stdout
# from a background thread; ui_hint() gives the same link.
_MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
}


def flatten_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """MLflow params are flat strings: nested sections become dotted keys."""
    flat: dict[str, str] = {}
    for key, value in d.items():
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def _best_effort(default: Any = None, disabled: Any = None) -> Callable[[Callable], Callable]:
    """Public methods run on the training thread: a tracking bug must only cost a warning."""

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(self: Tracker, *args: Any, **kwargs: Any) -> Any:
            if self._worker is None:
                return disabled
            try:
                return fn(self, *args, **kwargs)
            except Exception:
                logger.warning("tracking: %s failed; training continues", fn.__name__, exc_info=True)
                return default

        return wrapper

    return decorate


class Tracker:
    """Non-blocking MLflow run: `log_*` enqueue, a daemon thread delivers.

    `run_id` is known once the run exists: at once when resuming (`run_id=` given), after
    the first successful contact otherwise, and None while the server is unreachable.
    `job_key` names the training job across restarts: without a `run_id`, the run tagged with
    the same key (created by an earlier process that died before checkpointing the id) continues.
    `enabled=False` makes every method a no-op, for non-zero ranks. `local_dir` keeps the pictures
    (the run's local record, see local_record.py); `resume` reconciles a resumed job with its run's
    history; `on_run(run_id)` is called once the run exists.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        run_name: str,
        run_id: str | None = None,
        tags: dict[str, str] | None = None,
        flush_interval: float = 5.0,
        enabled: bool = True,
        max_backlog: int = 100_000,
        job_key: str | None = None,
        local_dir: str | os.PathLike[str] | None = None,
        resume: Reconcile | None = None,
        on_run: Callable[[str], None] | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.enabled = enabled
        self._outbox = Outbox(max_backlog)
        self._bad_keys: set[str] = set()
        self._worker: DeliveryWorker | None = None
        if not enabled:
            return
        for name, value in _MLFLOW_ENV_DEFAULTS.items():
            os.environ.setdefault(name, value)
        # Imported here, on the training thread, before the worker starts: two threads importing mlflow at
        # once (the worker's client, the system-metrics samplers) can leave `mlflow.tracking` partially
        # initialized in one of them, and every later send fails.
        import mlflow.tracking  # noqa: F401

        self._worker = DeliveryWorker(
            self._outbox,
            tracking_uri,
            experiment,
            run_name,
            run_id,
            flush_interval,
            job_key,
            str(local_dir) if local_dir is not None else None,
            resume,
            on_run,
        )
        if tags:
            self.set_tags(tags)

    @property
    def run_id(self) -> str | None:
        return self._worker.run_id if self._worker else None

    @property
    def dropped_metrics(self) -> int:
        """Metric points lost to the backlog cap during a long outage."""
        return self._outbox.dropped_metrics

    @_best_effort()
    def log_params(self, params: Mapping[str, object]) -> None:
        entries = {k: str(v)[:MAX_PARAM_LEN] for k, v in params.items() if self._check_key(k)}
        with self._outbox.cond:
            self._outbox.params.update(entries)

    @_best_effort()
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        now_ms = int(time.time() * 1000)
        points = [(k, float(v), now_ms, int(step)) for k, v in metrics.items() if self._check_key(k)]
        self._outbox.add_metrics(points)

    @_best_effort()
    def log_artifact_file(self, path: str, artifact_path: str | None = None) -> None:
        """The file is read at upload time, so it must stay in place until flush()."""
        with self._outbox.cond:
            self._outbox.uploads.append(Upload(os.path.abspath(path), artifact_path, staged=False))

    @_best_effort()
    def log_image(self, image: Any, name: str, step: int) -> None:
        """Copies the HWC uint8 image now; PNG encoding and upload happen on the worker."""
        array = image.detach().cpu().numpy() if hasattr(image, "detach") else np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))):
            raise ValueError(f"expected HWC uint8 with 1, 3 or 4 channels, got {array.dtype} {array.shape}")
        file_name = f"{_UNSAFE_FILE_CHARS.sub('_', name)}_step{int(step):08d}.png"
        with self._outbox.cond:
            self._outbox.images.append((array.copy(), file_name))

    @_best_effort()
    def set_tags(self, tags: Mapping[str, str]) -> None:
        entries = {k: str(v)[:MAX_TAG_LEN] for k, v in tags.items() if self._check_key(k)}
        with self._outbox.cond:
            self._outbox.tags.update(entries)

    @_best_effort(default=False, disabled=True)
    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything queued so far is delivered; False on timeout."""
        return self._worker.flush(timeout)

    @_best_effort()
    def close(self, timeout: float = 30.0, status: str = "FINISHED") -> None:
        """Deliver the backlog, then end the run as FINISHED, FAILED or KILLED."""
        if not self._worker.stop(timeout, status):
            logger.warning(
                "tracking: gave up after %.1fs; unsent: %s.%s",
                timeout,
                self._outbox.unsent(),
                " They are kept in the run directory: deliver them later with `pretrain tracking sync RUN_DIR`"
                if self._worker.local_dir
                else "",
            )

    def ui_hint(self) -> str:
        """Where to look at this run, for the startup log."""
        experiment_id = self._worker.experiment_id if self._worker else None
        return ui_hint(self.tracking_uri, experiment_id, self.run_id)

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.close(status="KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")

    def _check_key(self, key: str) -> bool:
        if isinstance(key, str) and is_valid_key(key):
            return True
        if key not in self._bad_keys:
            self._bad_keys.add(key)
            logger.warning(
                "tracking: skipping key %r: MLflow allows at most %d characters of "
                "letters, digits, _ - . : / and space",
                key,
                MAX_KEY_LEN,
            )
        return False
