"""Logging setup: rank-tagged lines on stderr and one log file per rank in the run directory."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


class _RunLogFile(logging.FileHandler):
    """The rank's log file. A write that fails (a full disk) costs one line on stderr, not a traceback per
    record: the console still carries the messages."""

    _failed = False

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 -- logging's name
        if not self._failed:
            self._failed = True
            error = sys.exc_info()[1]
            print(f"logging: cannot write {self.baseFilename} ({error}); continuing without it", file=sys.stderr)


def setup_logging(run_dir: Path | None = None, rank: int = 0, level: int = logging.INFO) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank{rank}] %(name)s: %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_pretrain", False):
            root.removeHandler(handler)
            handler.close()
    handlers: list[logging.Handler] = []
    if rank == 0:  # other ranks write only their file, so the console stays readable
        handlers.append(logging.StreamHandler(sys.stderr))
    if run_dir is not None:
        log_dir = Path(run_dir) / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(_RunLogFile(log_dir / f"rank_{rank:05d}.log"))
    for handler in handlers:
        handler.setFormatter(fmt)
        handler._pretrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
