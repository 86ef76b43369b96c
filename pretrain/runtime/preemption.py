"""Stop requests from the scheduler: SIGUSR1 (SLURM's warning before the time limit) and SIGTERM
(scancel, node drain, torchrun shutting its workers down).

The handler only records the signal: it runs between two bytecodes of whatever the main thread is
doing (possibly inside a collective), so it must not write files or talk to other ranks. The train
loop reads the flag at the next step boundary, agrees with the other ranks on it, checkpoints and
returns; the process then exits with `PREEMPTED_EXIT_CODE`.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping

log = logging.getLogger("pretrain.runtime.preemption")

# EX_TEMPFAIL: "try again later". The batch script requeues the job on it.
PREEMPTED_EXIT_CODE = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Catches the stop signals while installed; `signum` is the last one received (0: none)."""

    def __init__(self, signals: tuple[signal.Signals, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum = 0
        self._previous: dict[signal.Signals, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def _handle(self, signum: int, frame: object) -> None:
        self.signum = signum

    def install(self) -> StopRequest:
        # Python delivers signals to the main thread only; a loop run from another thread keeps the defaults.
        if threading.current_thread() is not threading.main_thread():
            log.debug("not the main thread: stop signals keep their default handlers")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *_: object) -> None:
        self.restore()


def exit_code_after_stop(stopped_by: str | None, env: Mapping[str, str] | None = None) -> int:
    """The process exit code after `fit` returned. Under torchrun a stopped worker exits 0: the agent
    counts any other code as a failure and would restart the workers (`--max-restarts`) into a job
    that is about to end; the batch script knows it was signalled and requeues on that instead."""
    if stopped_by is None:
        return 0
    env = os.environ if env is None else env
    return 0 if "TORCHELASTIC_RUN_ID" in env else PREEMPTED_EXIT_CODE
