"""System metrics (`tracking.system_metrics`): CPU and memory use, and per GPU its utilization, memory and
power where NVML is available (`pip install nvidia-ml-py`), under MLflow's own `system/` keys, which its UI
shows on the run's System metrics tab.

MLflow's own monitor sends through a client of its own and stops for good at the first failed request.
Here MLflow's sampling classes only measure; the samples go into the run's Tracker like every other
metric, so they are batched, sent in the background, and kept through a tracking-server outage.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from pretrain.tracking.tracker import Tracker

logger = logging.getLogger("pretrain.tracking")

PREFIX = "system/"
DEFAULT_INTERVAL = 10.0  # seconds; MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL overrides it, as for MLflow's monitor


def _monitors() -> list:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    monitors = [CPUMonitor()]
    try:  # NVML: needs an NVIDIA driver and the nvidia-ml-py package
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        monitors.append(GPUMonitor())
    except Exception as exc:  # ImportError without pynvml, NVMLError without a driver
        import torch

        level = logging.WARNING if torch.cuda.is_available() else logging.DEBUG  # only news where GPUs are
        logger.log(level, "system metrics: no GPU metrics (%s: %s)", type(exc).__name__, exc)
    return monitors


class SystemMetrics:
    """Samples every `interval` seconds on a daemon thread; each sample is logged at the training step
    `step()` returns at that moment, so a resumed run continues the same axis."""

    def __init__(self, tracker: Tracker, step: Callable[[], int], interval: float | None = None) -> None:
        env = os.environ.get("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        self.interval = float(env) if env else (interval or DEFAULT_INTERVAL)
        self.tracker, self.step = tracker, step
        self.monitors = _monitors()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the monitors keep samples in plain dicts
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> SystemMetrics:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop sampling after logging one last sample."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.interval + 5)

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        with self._lock:
            for monitor in self.monitors:
                monitor.collect_metrics()
                metrics.update({f"{PREFIX}{k}": float(v) for k, v in monitor.aggregate_metrics().items()})
                monitor.clear_metrics()
        return metrics

    def _loop(self) -> None:
        while True:
            stopping = self._stop.wait(self.interval)
            try:
                self.tracker.log_metrics(self.sample(), step=self.step())
            except Exception:  # a sampling failure costs the metrics, never the run
                logger.warning("system metrics: sampling failed; stopping them", exc_info=True)
                return
            if stopping:
                return
