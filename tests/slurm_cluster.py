"""A real two-node SLURM cluster on this host for tests: Debian's slurmctld and two `slurmd -N`
daemons (MULTIPLE_SLURMD), auth/none, every path in a temp directory, stopped by PID at the end.

Run it by hand to poke at it: `python tests/slurm_cluster.py /tmp/slurm` starts the cluster, prints
the SLURM_CONF to export, and stops the daemons on Enter.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "sacct", "scancel", "srun")
NODES = ("node1", "node2")


def _find(name: str) -> str | None:
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/usr/bin") if (p := Path(d) / name).is_file()), None
    )


def missing_programs() -> list[str]:
    return [name for name in (*DAEMONS, *CLIENTS) if _find(name) is None]


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def write_config(root: Path) -> Path:
    """slurm.conf for one controller and two 1-CPU nodes on 127.0.0.1 with their own ports.

    Container-safe plugins (no cgroups), no accounting daemon, a 5 s credential lifetime (SLURM holds
    a requeued job back for that long, 120 s by default) and a scheduling pass every second (60 s by
    default), so a requeued job starts again within seconds."""
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    user = getpass.getuser()
    host = socket.gethostname()
    for sub in ("state", "spool", "log", "run"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 RealMemory=1000 State=UNKNOWN"
        for name, port in zip(NODES, node_ports)
    )
    conf = root / "slurm.conf"
    conf.write_text(
        f"""ClusterName=pretraintest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser={user}
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
LaunchParameters=use_interactive_step
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
JobRequeue=1
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
    )
    return conf


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    pids: list[int]

    @property
    def env(self) -> dict[str, str]:
        """What a client needs: the config (no /etc/slurm here)."""
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **self.env}, check=False
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr}{self.log_tail()}")
        return out

    def job_state(self, job_id: str) -> str:
        out = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        state = out.stdout.strip()
        if state:
            return state
        out = self.run("scontrol", "show", "job", job_id, check=False)
        for field in out.stdout.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def log_tail(self, chars: int = 3000) -> str:
        parts = []
        for log in sorted((self.root / "log").glob("*.log")):
            parts.append(f"\n--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "".join(parts)


def _wait_nodes_idle(cluster: SlurmCluster, deadline: float) -> None:
    while time.monotonic() < deadline:
        out = cluster.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        if len(states) == len(NODES) and all(s.rstrip("*") == "idle" for s in states.values()):
            return
        time.sleep(0.3)
    raise RuntimeError(f"SLURM nodes did not come up idle: {out.stdout}{out.stderr}{cluster.log_tail()}")


def _stop(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def slurm_cluster(root: Path, timeout: float = 60) -> Iterator[SlurmCluster]:
    """Start slurmctld and one slurmd per node in the foreground (-D), so their PIDs are ours."""
    conf = write_config(root)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs: list[subprocess.Popen] = []
    cluster = SlurmCluster(root, conf, [])
    try:
        commands = [[_find("slurmctld"), "-D", "-i", "-f", str(conf)]]
        commands += [[_find("slurmd"), "-D", "-N", name, "-f", str(conf)] for name in NODES]
        for cmd in commands:
            log = open(root / "log" / f"{Path(cmd[0]).name}-{cmd[-3] if '-N' in cmd else 'ctld'}.out", "wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
            log.close()
            cluster.pids.append(procs[-1].pid)
        _wait_nodes_idle(cluster, time.monotonic() + timeout)
        yield cluster
    finally:
        # Jobs still running would outlive their daemons: cancel ours first, then stop the daemons.
        with contextlib.suppress(Exception):
            subprocess.run(["scancel", "--full", "-u", getpass.getuser()], env=env, timeout=10, capture_output=True)
            time.sleep(0.5)
        for proc in reversed(procs):
            _stop(proc.pid)


if __name__ == "__main__":
    with slurm_cluster(Path(sys.argv[1])) as running:
        print(f"export SLURM_CONF={running.conf}  # daemons {running.pids}; Enter stops them")
        input()
