"""What was logged but not yet delivered, shared by the training thread and the worker."""

from __future__ import annotations

import dataclasses
import logging
import posixpath
import re
import threading
from collections import deque
from collections.abc import Iterable

import numpy as np

logger = logging.getLogger("pretrain.tracking")

# MLflow's limits (mlflow.utils.validation): the server rejects anything beyond them.
MAX_KEY_LEN = 250
MAX_PARAM_LEN = 6000
MAX_TAG_LEN = 8000
_VALID_KEY = re.compile(r"^[/\w.\- :]*$")

MetricPoint = tuple[str, float, int, int]  # key, value, timestamp (ms), step


def is_valid_key(key: str) -> bool:
    """MLflow's rule for metric/param/tag keys, checked up front: one bad key in a batch
    would get the whole batch rejected."""
    norm = posixpath.normpath(key)
    return (
        len(key) <= MAX_KEY_LEN
        and _VALID_KEY.match(key) is not None
        and norm == key
        and norm != "."
        and not norm.startswith(("..", "/"))
    )


@dataclasses.dataclass
class Upload:
    local_path: str
    artifact_dir: str | None
    staged: bool  # the worker wrote this file, so it deletes it once uploaded


class Outbox:
    """Pending tracking data behind one condition variable.

    Metrics are the only unbounded stream, so only they are capped: past `max_backlog`
    points the oldest are dropped and counted. `sending` marks a batch the worker has taken
    out but not yet confirmed, so `drained()` can't report success mid-send.
    """

    def __init__(self, max_backlog: int) -> None:
        self.cond = threading.Condition()
        self.metrics: deque[MetricPoint] = deque()
        self.params: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.images: deque[tuple[np.ndarray, str]] = deque()
        self.uploads: deque[Upload] = deque()
        self.sending = False
        self.max_backlog = max_backlog
        self.dropped_metrics = 0

    def add_metrics(self, points: Iterable[MetricPoint]) -> None:
        with self.cond:
            self.metrics.extend(points)
            self._trim()

    def take_metrics(self, n: int) -> list[MetricPoint]:
        with self.cond:
            return [self.metrics.popleft() for _ in range(min(n, len(self.metrics)))]

    def requeue_metrics(self, chunk: list[MetricPoint]) -> None:
        with self.cond:
            self.metrics.extendleft(reversed(chunk))
            self._trim()

    def _trim(self) -> None:
        overflow = len(self.metrics) - self.max_backlog
        if overflow <= 0:
            return
        if self.dropped_metrics == 0:
            logger.warning("tracking: backlog over %d metric points; dropping the oldest", self.max_backlog)
        for _ in range(overflow):
            self.metrics.popleft()
        self.dropped_metrics += overflow

    def has_data(self) -> bool:
        """Anything queued, not counting a batch that is in the worker's hands."""
        return bool(self.metrics or self.params or self.tags or self.images or self.uploads)

    def drained(self) -> bool:
        return not (self.sending or self.has_data())

    def unsent(self) -> str:
        with self.cond:
            return (
                f"{len(self.metrics)} metric points, {len(self.params) + len(self.tags)} params/tags, "
                f"{len(self.images) + len(self.uploads)} artifacts"
            )
