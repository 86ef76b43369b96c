"""One writer per run directory: a lock file that names its holder.

Two processes writing one run directory overwrite each other's checkpoints, delete each other's
temporary checkpoints and log into one MLflow run. The lock is `RUN_DIR/run.lock`, a JSON file with
the holder's pid, host, start time and job id, taken before any other work.

Why a file made by `link` and not `flock`: `flock` is unreliable or a no-op on several shared
filesystems (NFS without lockd, some Lustre and GPFS mounts). Creating a hard link to a fully written
temporary file is atomic and fails if the name exists on NFSv3+, Lustre and GPFS, and the lock never
exists half-written. What this relies on: atomic `link()` and `rename()` within one directory.

Who may take a held lock:
- the same job: a SLURM job keeps its id across requeues (SLURM_JOB_ID), a torchrun job its rendezvous
  id across restarts (TORCHELASTIC_RUN_ID), so a requeued or restarted job takes over its own lock;
- anyone, when the holder ran on this host and its pid is gone (a killed process): a stale lock;
- anyone with `force` (`pretrain train --force`), for a holder on another host that is known to be gone.

Only the job's global rank 0 takes the lock; the other ranks of the job share it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from pretrain.config import UserError

log = logging.getLogger("pretrain.runtime")

LOCK_FILE = "run.lock"


class RunLockedError(UserError):
    """Another live process holds the run directory."""


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    started: str
    job: str | None  # the scheduler's job id, shared by a job's ranks and its requeues
    token: str  # tells two holders apart even if pid and host repeat

    def describe(self) -> str:
        job = f", job {self.job}" if self.job else ""
        return f"pid {self.pid} on host {self.host}{job}, since {self.started}"


def check_writable(run_dir: str | os.PathLike[str]) -> None:
    """Fail at start, naming the directory, if the run cannot write there (read-only, no permission,
    not a directory). Writes a probe file: permission bits alone say nothing for root or on ACLs."""
    run_dir = Path(run_dir)
    probe = run_dir / f".write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(
            f"cannot write to the run directory {run_dir} (run.output_dir / run.name): {exc.strerror or exc}"
        ) from None


def job_id(env: dict[str, str] | None = None) -> str | None:
    """The id a job keeps across requeues and restarts, or None for a plain process."""
    env = dict(os.environ) if env is None else env
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    if env.get("TORCHELASTIC_RUN_ID"):
        return f"torchrun:{env['TORCHELASTIC_RUN_ID']}"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def read_holder(path: Path) -> Holder | None:
    """The lock's holder, or None if there is no lock (an unreadable one is reported, not guessed at)."""
    try:
        raw = json.loads(path.read_text())
        return Holder(int(raw["pid"]), str(raw["host"]), str(raw["started"]), raw.get("job"), str(raw["token"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RunLockedError(
            f"{path} exists but cannot be read ({exc}); remove it if no run is using {path.parent}"
        ) from None


def holder_is_live(holder: Holder) -> bool | None:
    """True/False when it can be told from here (same host), None for a holder on another host."""
    if holder.host != socket.gethostname():
        return None
    return _pid_alive(holder.pid)


class RunLock:
    """The lock of one run directory, held from `acquire()` to `release()` (or the process's death)."""

    def __init__(self, run_dir: str | os.PathLike[str], env: dict[str, str] | None = None) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.me = Holder(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            job=job_id(env),
            token=uuid.uuid4().hex,
        )
        self.held = False

    def acquire(self, force: bool = False) -> RunLock:
        """Take the lock, or raise RunLockedError naming the holder and what to do."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{LOCK_FILE}.{self.me.host}.{self.me.pid}.{self.me.token[:8]}")
        tmp.write_text(json.dumps(asdict(self.me)) + "\n")
        try:
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                self._take_over(tmp, force)
        finally:
            tmp.unlink(missing_ok=True)
        if read_holder(self.path) != self.me:  # lost a race with another taker
            raise RunLockedError(f"{self.path.parent} was locked by another process at the same moment; not starting")
        self.held = True
        return self

    def _take_over(self, tmp: Path, force: bool) -> None:
        holder = read_holder(self.path)
        if holder is None:  # released between our link and the read
            os.link(tmp, self.path)
            return
        live = holder_is_live(holder)
        if live and holder.pid == self.me.pid:  # this process starts another trainer on the run
            os.replace(tmp, self.path)
            return
        if holder.job is not None and holder.job == self.me.job:
            reason = f"this job ({holder.job}) takes over its own lock from {holder.describe()}"
        elif live is False:
            reason = f"taking over a stale lock: {holder.describe()} is no longer running"
        elif force:
            reason = f"--force: taking over the lock of {holder.describe()}"
        elif live is True:
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by {holder.describe()}; "
                "wait for it, stop it, or choose another run.name"
            )
        else:
            raise RunLockedError(
                f"run directory {self.path.parent} is locked by {holder.describe()}, which this host cannot "
                f"check; if that process is gone, rerun with --force (or remove {self.path})"
            )
        log.warning("%s: %s", self.path, reason)
        os.replace(tmp, self.path)

    def release(self) -> None:
        """Remove the lock if it is still ours (a --force taker may own it now)."""
        if not self.held:
            return
        self.held = False
        try:
            if read_holder(self.path) == self.me:
                self.path.unlink()
        except (OSError, RunLockedError):
            log.warning("could not release %s", self.path, exc_info=True)
