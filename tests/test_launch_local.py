"""Launchers on this machine: `pretrain launch local` (torchrun) and `pretrain launch accelerate`
with 2 processes; stop requests (a signal to one rank stops every rank at the same step, with a
checkpoint); and the hang watchdog ending a run in which one rank stalls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from launch.accelerate import accelerate_config
from pretrain.checkpoint import CheckpointManager, read_meta
from pretrain.recipes import load_config
from pretrain.runtime.preemption import PREEMPTED_EXIT_CODE, StopRequest, exit_code_after_stop
from pretrain.runtime.watchdog import HUNG_EXIT_CODE, Watchdog

from tiny import tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/mae_vit_tiny_digits.toml"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
pytestmark = pytest.mark.slow


def _sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def _overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    return tiny_overrides(out, shards, "tracking.enabled=false", "engine.kind=ddp", *extra)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while len(_steps(run_dir)) < step:
        assert proc.poll() is None, f"exited early: {proc.communicate()[0][-4000:]}"
        assert time.monotonic() < deadline, f"no step {step} in {timeout}s"
        time.sleep(0.1)


def _descendants(pid: int) -> list[int]:
    """Processes below `pid` (ours), from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _rank_pid(launcher: int, rank: int) -> int:
    for pid in _descendants(launcher):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ):
            return pid
    raise AssertionError(f"no rank {rank} worker below {launcher}")


def test_stop_request_and_exit_codes():
    previous = signal.getsignal(signal.SIGUSR1)
    with StopRequest() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        assert stop.requested and stop.name == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is previous
    assert exit_code_after_stop(None, {}) == 0
    assert exit_code_after_stop("SIGTERM", {}) == PREEMPTED_EXIT_CODE
    assert exit_code_after_stop("SIGUSR1", {"TORCHELASTIC_RUN_ID": "x"}) == 0  # torchrun would restart on != 0


def test_watchdog_dumps_stacks_to_the_log_and_exits(tmp_path):
    assert Watchdog(0).start()._thread is None  # 0 turns it off
    log = tmp_path / "rank_00000.log"
    script = textwrap.dedent(
        f"""
        import time
        from pretrain.runtime.watchdog import Watchdog

        def stall_here():
            time.sleep(60)

        watchdog = Watchdog(0.3, {str(log)!r}).start()
        for _ in range(20):  # beating steps keep it quiet, the first step included
            time.sleep(0.05)
            watchdog.beat()
        print("steps done", flush=True)
        stall_here()
        """
    )
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=ENV)
    assert out.returncode == HUNG_EXIT_CODE and time.monotonic() - started < 30
    assert out.stdout == "steps done\n"
    text = log.read_text()
    assert "watchdog: rank 0 finished no training step in 0.3s" in text
    assert "in stall_here" in text and "Thread" in text
    assert "in stall_here" in out.stderr


def test_sigterm_checkpoints_and_exits_with_the_preempted_code(tmp_path, digit_shards):
    overrides = tiny_overrides(tmp_path, digit_shards, "tracking.enabled=false", "train.steps=500")
    cmd = [sys.executable, "-m", "pretrain.cli", "train", str(CONFIG), *_sets(overrides)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for_step(proc, tmp_path / "tiny", 2)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == PREEMPTED_EXIT_CODE, output[-3000:]
    step = _steps(tmp_path / "tiny")[-1]
    assert f"finished at step {step} (stopped by SIGTERM)" in output and step < 500
    assert read_meta(CheckpointManager(tmp_path / "tiny" / "checkpoints").latest())["step"] == step


def test_launch_local_two_ranks_stop_together_when_one_is_signalled(tmp_path, digit_shards):
    overrides = _overrides(tmp_path, digit_shards, "train.steps=500")
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "local", "--nproc", "2", str(CONFIG), *_sets(overrides)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = tmp_path / "tiny"
    _wait_for_step(proc, run_dir, 2)
    os.kill(_rank_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only: rank 0 learns it from the step's all-reduce
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output[-4000:]

    step = _steps(run_dir)[-1]
    checkpoint = CheckpointManager(run_dir / "checkpoints").latest()
    assert step < 500 and (read_meta(checkpoint)["step"], read_meta(checkpoint)["world_size"]) == (step, 2)
    logs = run_dir / "logs"
    assert f"step {step}: stopping on SIGUSR1" in (logs / "rank_00001.log").read_text()
    assert f"step {step}: stopping on a stop signal on another rank" in (logs / "rank_00000.log").read_text()
    # torchrun's per-rank stdout/stderr files, next to the ranks' own logs
    for rank in (0, 1):
        (stdout,) = logs.glob(f"torchrun/*/attempt_0/{rank}/stdout.log")
        assert f"finished at step {step} (stopped by" in stdout.read_text()


def test_launch_accelerate_two_processes_train_and_checkpoint(tmp_path, digit_shards):
    overrides = _overrides(tmp_path, digit_shards, "train.steps=3")
    cmd = [sys.executable, "-m", "pretrain.cli", "launch", "accelerate", "--nproc", "2", str(CONFIG)]
    out = subprocess.run([*cmd, *_sets(overrides)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    run_dir = tmp_path / "tiny"
    generated = yaml.safe_load((run_dir / "accelerate.yaml").read_text())
    assert (generated["distributed_type"], generated["num_processes"]) == ("MULTI_GPU", 2)
    assert _steps(run_dir) == [1, 2, 3]
    meta = read_meta(CheckpointManager(run_dir / "checkpoints").latest())
    assert (meta["step"], meta["world_size"], meta["engine"]) == (3, 2, "ddp")

    deepspeed = load_config(CONFIG, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"])
    generated = accelerate_config(deepspeed, 4, 29500)
    assert generated["distributed_type"] == "DEEPSPEED" and generated["deepspeed_config"]["zero_stage"] == 3


def test_watchdog_ends_a_run_with_a_stalled_rank(tmp_path, digit_shards):
    overrides = _overrides(tmp_path, digit_shards, "train.steps=500", "train.watchdog_timeout=2")
    worker = [str(REPO / "tests/launch_stall_worker.py"), str(CONFIG), "1", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", *worker]
    started = time.monotonic()
    out = subprocess.run([*cmd, *_sets(overrides)], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and time.monotonic() - started < 120
    logs = tmp_path / "tiny" / "logs"
    stalled, waiting = (logs / "rank_00001.log").read_text(), (logs / "rank_00000.log").read_text()
    assert "watchdog: rank 1 finished no training step in 2s" in stalled and "in stalled_optimizer_step" in stalled
    # rank 0 waits for rank 1 in the step's next collective
    assert "watchdog: rank 0 finished no training step in 2s" in waiting and "distributed_c10d.py" in waiting
    assert f"exitcode  : {HUNG_EXIT_CODE}" in out.stderr
