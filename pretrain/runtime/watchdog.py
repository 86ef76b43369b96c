"""Hang watchdog: a rank that finishes no step for `timeout` seconds dumps every thread's Python
stack to its log and exits, so a deadlocked collective or a stuck data worker ends the job (and
torchrun can restart it from the last checkpoint) instead of silently burning the allocation.

The first step gets `FIRST_STEP_FACTOR` times the timeout: it includes torch.compile, the first
collectives (NCCL communicator setup) and the data workers' start, which can take far longer than a
steady-state step. Checkpoint writes and visuals fall inside a step's interval, so the timeout must
cover the slowest of those too (the default, 30 minutes, does).
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("pretrain.runtime.watchdog")

HUNG_EXIT_CODE = 86
FIRST_STEP_FACTOR = 3.0
# After dumping, wait this long (at most the timeout) before exiting: the other ranks, stuck in the same
# collective, reach their own deadline and dump their stacks before this rank's exit breaks their connections.
EXIT_GRACE = 5.0


class Watchdog:
    """Call `beat()` whenever a step finishes; `timeout` <= 0 disables it."""

    def __init__(self, timeout: float, log_file: Path | None = None, rank: int = 0):
        self.timeout = timeout
        self.log_file = log_file
        self.rank = rank
        self._deadline = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Watchdog:
        if self.timeout > 0:
            self._deadline = time.monotonic() + FIRST_STEP_FACTOR * self.timeout
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self) -> None:
        self._deadline = time.monotonic() + self.timeout

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(5.0, max(0.05, self.timeout / 10))
        while not self._stop.wait(poll):
            if time.monotonic() > self._deadline:
                self._fire()

    def _fire(self) -> None:
        message = (
            f"watchdog: rank {self.rank} finished no training step in {self.timeout:g}s "
            f"(train.watchdog_timeout); stacks of every thread follow, then exit {HUNG_EXIT_CODE}\n"
        )
        log.error(message.strip())
        for stream in _streams(self.log_file):
            stream.write(message)
            stream.flush()
            faulthandler.dump_traceback(file=stream, all_threads=True)
            stream.flush()
        time.sleep(min(EXIT_GRACE, self.timeout))
        # os._exit: a normal exit would wait on the very thread that hangs (or on atexit hooks that do).
        os._exit(HUNG_EXIT_CODE)


def _streams(log_file: Path | None) -> list:
    streams = [sys.stderr]
    if log_file is not None:
        try:
            streams.append(open(log_file, "a"))  # noqa: SIM115 -- the process ends right after
        except OSError:
            pass
    return streams
