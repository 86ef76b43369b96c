"""Kills, full disks and careless users, each with real processes: no lost or doubled metric points, one
writer per run directory, resumes that honour changed settings, and one-line errors instead of tracebacks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.cli import main as pretrain_main
from pretrain.config import ConfigError
from pretrain.optim import warmup_cosine
from pretrain.recipes import load_config
from pretrain.resume_changes import check_changes
from pretrain.runtime.run_lock import LOCK_FILE, RunLock, RunLockedError
from pretrain.train import Trainer

from mlflow_server import free_port
from tiny import tiny_overrides

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
WORKER = TESTS / "reliability_worker.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "SLURM_JOB_ID")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(TESTS), env.get("PYTHONPATH", "")])
    return {**env, **extra}


def _train_cmd(*args: str) -> list[str]:
    return [sys.executable, str(WORKER), "train", str(REPO / "configs/mae_vit_tiny_digits.toml"), *args]


def _sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def _steps_in_jsonl(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _history_steps(client: MlflowClient, run_id: str, key: str = "loss") -> list[int]:
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before the awaited point")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the process")
        time.sleep(0.02)


def _latest_step(run_dir: Path) -> int:
    marker = run_dir / "checkpoints" / "latest"
    return int(marker.read_text().strip().split("_")[1]) if marker.is_file() else 0


# ---------------------------------------------------------------------------------------------- metrics


@pytest.mark.parametrize("delivery", ["queued", "delivered"])
def test_sigkill_right_after_a_checkpoint_loses_no_point_and_logs_none_twice(tmp_path, digit_shards, server, delivery):
    """queued: the killed process had sent nothing (long flush interval), so steps up to the checkpoint
    exist only in its on-disk record. delivered: it had sent points of steps after the checkpoint, which
    the resumed run re-runs and must not log again."""
    overrides = tiny_overrides(
        tmp_path,
        digit_shards,
        f'tracking.uri="{server}"',
        f"tracking.experiment=kill-{delivery}",
        "train.steps=14",
        "train.ckpt_every=6",
        f"tracking.flush_interval={600 if delivery == 'queued' else 0.1}",
    )
    run_dir = tmp_path / "tiny"
    first = subprocess.Popen(_train_cmd(*_sets(overrides)), env=_env(SLOW_STEP_S="0.3"), stderr=subprocess.DEVNULL)
    if delivery == "queued":
        _wait_for(lambda: _latest_step(run_dir) == 6, first)
    else:  # let the points of steps 7-9 reach the server first
        _wait_for(lambda: _latest_step(run_dir) == 6 and max(_steps_in_jsonl(run_dir)) >= 9, first)
        time.sleep(1.0)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert max(_steps_in_jsonl(run_dir)) >= 6

    resumed = subprocess.run(_train_cmd(*_sets(overrides)), env=_env(SLOW_STEP_S="0"), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "step_00000006" in resumed.stderr

    run_id = json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"]
    client = MlflowClient(server)
    assert _history_steps(client, run_id) == list(range(1, 15))  # every step, once
    assert _history_steps(client, run_id, "lr") == list(range(1, 15))
    assert _steps_in_jsonl(run_dir) == list(range(1, 15))
    assert client.get_run(run_id).info.status == "FINISHED"


def test_tracking_sync_delivers_a_run_whose_server_was_never_up_once(tmp_path, digit_shards, server, capsys):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    cfg = load_config(
        None,
        tiny_overrides(
            tmp_path,
            digit_shards,
            f'tracking.uri="{dead}"',
            "tracking.experiment=never-up",
            "tracking.close_timeout=1",
            "train.vis_every=3",
        ),
    )
    result = Trainer(cfg).fit()
    assert result.mlflow_run_id is None
    run_dir = cfg.run_dir
    assert len(list((run_dir / "tracking" / "images").glob("*.png"))) == 2  # kept for the sync

    assert pretrain_main(["tracking", "sync", str(run_dir), "--uri", server]) == 0
    first = capsys.readouterr().out
    run_id = json.loads((run_dir / "tracking" / "run.json").read_text())["run_id"]
    assert f"synced new run {run_id}" in first and "2 artifacts" not in first
    client = MlflowClient(server)
    run = client.get_run(run_id)
    assert run.data.tags["pretrain.job_key"] == read_job_key(run_dir)
    assert run.data.params["optim.base_lr"] == "0.001" and run.info.status == "FINISHED"
    for key in ("loss", "lr", "samples_per_sec"):
        assert _history_steps(client, run_id, key) == list(range(1, 7)), key
    artifacts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "images")
    }
    assert "config.json" in artifacts and sum(p.startswith("images/") for p in artifacts) == 2

    assert pretrain_main(["tracking", "sync", str(run_dir), "--uri", server]) == 0
    second = capsys.readouterr().out
    assert "added 0 params, 0 tags, 0 metric points, 0 artifacts" in second
    assert _history_steps(client, run_id) == list(range(1, 7))


def read_job_key(run_dir: Path) -> str:
    return json.loads((run_dir / "tracking" / "run.json").read_text())["job_key"]


# ---------------------------------------------------------------------------------------------- resume


def test_resume_with_changed_learning_rate_follows_the_documented_rule(tmp_path, digit_shards, caplog):
    """The schedule is rebuilt from the new settings at the resumed step: the lr of every later step is the
    new warmup + cosine evaluated there (base rate, warmup and length all changed here)."""
    common = ["tracking.enabled=false", "train.steps=12", "optim.warmup_steps=4", "train.ckpt_every=6"]
    Trainer(load_config(None, tiny_overrides(tmp_path, digit_shards, *common))).fit(until=6)
    changed = [*common, "optim.base_lr=3e-3", "optim.warmup_steps=8", "train.steps=16", "optim.min_lr=1e-5"]
    cfg = load_config(None, tiny_overrides(tmp_path, digit_shards, *changed))
    with caplog.at_level("WARNING", logger="pretrain.train"):
        trainer = Trainer(cfg)
    assert "optim.base_lr: 0.001 -> 0.003: the learning-rate schedule is rebuilt from the new settings at step 6" in (
        caplog.text
    )
    assert "train.steps: 12 -> 16" in caplog.text
    trainer.fit()
    rates = {r["step"]: r["lr"] for r in map(json.loads, (cfg.run_dir / "metrics.jsonl").read_text().splitlines())}
    peak, floor = 3e-3 * 8 / 256, 1e-5 * 8 / 256  # linear scaling with the global batch of 8
    for step in range(7, 17):  # the lr logged at step s is the one optimizer step s - 1 (0-based) used
        assert rates[step] == pytest.approx(warmup_cosine(step - 1, 16, 8, peak, floor), rel=1e-12), step
    before = warmup_cosine(5, 12, 4, 1e-3 * 8 / 256, 0.0)
    assert rates[6] == pytest.approx(before, rel=1e-12)  # steps before the resume keep the old schedule


def test_each_changed_setting_is_refused_or_told_what_it_does():
    before = {"optim.base_lr": "0.001", "optim.grad_clip": "1.0", "data.batch_size": "8", "tracking.uri": "",
              "data.num_workers": "0", "model.size": "tiny", "train.log_every": "1"}  # fmt: skip
    now = {**before, "optim.base_lr": "0.002", "optim.grad_clip": "0.5", "data.batch_size": "16",
           "tracking.uri": "http://x", "data.num_workers": "2", "train.log_every": "5"}  # fmt: skip
    lines = check_changes(before, now, 40, "ckpt")
    assert lines == [
        "data.batch_size: 8 -> 16: a new global batch from step 40; linear lr scaling follows it; data positions "
        "are kept",
        "data.num_workers: 0 -> 2: a new stream layout: data streams restart at the start of the saved epoch",
        "optim.base_lr: 0.001 -> 0.002: the learning-rate schedule is rebuilt from the new settings at step 40",
        "optim.grad_clip: 1.0 -> 0.5: gradient clipping with the new threshold from step 40",
        "train.log_every: 1 -> 5: from step 40",
    ]  # tracking.uri: where metrics go, not what training computes
    with pytest.raises(ConfigError, match=r"model.size: tiny -> base \(the network changed\)"):
        check_changes(before, {**now, "model.size": "base"}, 40, "ckpt")
    # starting from the weights only: everything but the network may change
    seeded = check_changes(before, {**now, "run.seed": "3"}, 40, "ckpt", weights_only=True)
    assert seeded == sorted([*lines, "run.seed: None -> 3: takes effect from step 40"])


def test_resume_refuses_changes_that_break_the_data_order_naming_them(tmp_path, digit_shards):
    common = ["tracking.enabled=false", "train.ckpt_every=2"]
    Trainer(load_config(None, tiny_overrides(tmp_path, digit_shards, *common))).fit(until=2)
    cfg = load_config(None, tiny_overrides(tmp_path, digit_shards, *common, "run.seed=7", "data.shuffle_buffer=9"))
    with pytest.raises(ConfigError, match=r"data.shuffle_buffer: 50 -> 9 .*run.seed: 0 -> 7 .*train.init_from"):
        Trainer(cfg)


# ---------------------------------------------------------------------------------------------- the lock


def test_a_second_process_on_a_live_run_directory_refuses_naming_the_holder(tmp_path, digit_shards):
    overrides = tiny_overrides(tmp_path, digit_shards, "tracking.enabled=false", "train.steps=400")
    first = subprocess.Popen(_train_cmd(*_sets(overrides)), env=_env(SLOW_STEP_S="0.2"), stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: (tmp_path / "tiny" / "metrics.jsonl").is_file(), first)
        second = subprocess.run(_train_cmd(*_sets(overrides)), env=_env(), capture_output=True, text=True)
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    assert f"is in use by pid {first.pid} on host {socket.gethostname()}" in second.stderr.strip().splitlines()[-1]
    assert "Traceback" not in second.stderr


def _fake_lock(run_dir: Path, pid: int, host: str, job: str | None = None) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    holder = {"pid": pid, "host": host, "started": "2026-01-01T00:00:00", "job": job, "token": "x" * 32}
    (run_dir / LOCK_FILE).write_text(json.dumps(holder))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_lock_is_taken_over_and_a_foreign_one_needs_force(tmp_path, digit_shards, caplog):
    run_dir = tmp_path / "tiny"
    _fake_lock(run_dir, _dead_pid(), socket.gethostname())
    with caplog.at_level("WARNING", logger="pretrain.runtime"):
        trainer = Trainer(load_config(None, tiny_overrides(tmp_path, digit_shards, "tracking.enabled=false")))
    assert "taking over a stale lock" in caplog.text and "is no longer running" in caplog.text
    trainer.fit(until=1)
    assert not (run_dir / LOCK_FILE).exists()  # released at the end

    _fake_lock(run_dir, 1, "another-host")
    with pytest.raises(RunLockedError, match="another-host.*which this host cannot check.*--force"):
        RunLock(run_dir).acquire()
    RunLock(run_dir).acquire(force=True).release()

    _fake_lock(run_dir, 1, "another-host", job="slurm:77")  # a requeued job takes over its own lock
    lock = RunLock(run_dir, env={"SLURM_JOB_ID": "77"}).acquire()
    assert json.loads((run_dir / LOCK_FILE).read_text())["job"] == "slurm:77"
    lock.release()
    _fake_lock(run_dir, 1, "another-host", job="slurm:77")
    with pytest.raises(RunLockedError, match="job slurm:77"):
        RunLock(run_dir, env={"SLURM_JOB_ID": "78"}).acquire()


# ---------------------------------------------------------------------------------------------- errors


def _namespace_available() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
        capture_output=True,
    )
    return None if probe.returncode == 0 else f"no mount namespaces here: {probe.stderr.decode().strip()}"


needs_namespace = pytest.mark.skipif(
    _namespace_available() is not None, reason=f"a private tmpfs needs mount namespaces ({_namespace_available()})"
)


def _in_namespace(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`script` (sh) in a private mount namespace, where it may mount a tmpfs without privileges."""
    return subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@needs_namespace
def test_a_full_disk_during_a_checkpoint_gives_one_message_and_keeps_the_previous(tmp_path, digit_shards):
    """A small tmpfs holds the run: the checkpoint of step 2 (63 MB) fits; ballast then fills the disk, so
    step 4's does not. The second run must say the disk is full, keep step 2 intact and leave no partial
    directory; with the ballast gone, the same command resumes from step 2."""
    disk = tmp_path / "disk"
    disk.mkdir()
    overrides = tiny_overrides(disk, digit_shards, "tracking.enabled=false", "train.ckpt_every=2", "train.steps=4")
    cmd = " ".join(f"'{c}'" for c in _train_cmd(*_sets(overrides)))
    run = disk / "tiny"
    script = f"""
        mount -t tmpfs -o size=200m tmpfs '{disk}' || exit 90
        {cmd} --until 2 >/dev/null 2>&1 || exit 91
        used=$(du -sk '{run}/checkpoints' | cut -f1)
        free=$(df -k --output=avail '{disk}' | tail -1)
        fallocate -l $(( (free - used / 2) * 1024 )) '{disk}/ballast' || exit 92
        {cmd} 2>'{tmp_path}/full.err'; echo "exit=$?"
        ls -a '{run}/checkpoints'
        rm '{disk}/ballast'
        {cmd} >/dev/null 2>'{tmp_path}/resume.err'; echo "resume-exit=$?"
        cat '{run}/checkpoints/latest'
    """
    out = _in_namespace(script, _env(SLOW_STEP_S="0"))
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr)
    lines = out.stdout.split()
    full_err = (tmp_path / "full.err").read_text()
    assert "exit=2" in lines, (out.stdout, full_err)
    last = full_err.strip().splitlines()[-1]
    assert last.startswith("error: disk full: checkpoint step 4 could not be written to"), full_err
    assert "free)" in last and "step_00000002 is intact" in last and "run the same command again" in last
    assert "Traceback" not in full_err and "checkpoint step 4 may not fit" in full_err  # warned before writing
    listing = lines[lines.index("exit=2") + 1 : lines.index("resume-exit=0")]
    assert not [name for name in listing if name.startswith(".tmp-")] and "step_00000002" in listing
    assert lines[-1] == "step_00000004", (tmp_path / "resume.err").read_text()[-2000:]


def _readonly_run(tmp_path: Path, command: list[str]) -> subprocess.CompletedProcess:
    out = tmp_path / "ro"
    out.mkdir()
    if os.geteuid() != 0:  # permission bits stop anyone but root
        out.chmod(0o555)
        return subprocess.run(command, env=_env(), capture_output=True, text=True)
    if _namespace_available() is not None:
        pytest.skip(f"root ignores permission bits and {_namespace_available()}")
    cmd = " ".join(f"'{c}'" for c in command)
    return _in_namespace(f"mount -t tmpfs -o ro tmpfs '{out}' && {cmd}", _env())


def test_a_read_only_output_directory_and_a_missing_resume_path_are_one_line_each(tmp_path, digit_shards):
    readonly = _readonly_run(tmp_path, _train_cmd(*_sets(tiny_overrides(tmp_path / "ro", digit_shards))))
    assert readonly.returncode == 2, readonly.stderr
    assert readonly.stderr.strip().splitlines() == [
        f"error: cannot write to the run directory {tmp_path / 'ro' / 'tiny'} (run.output_dir / run.name): "
        "Read-only file system"
        if os.geteuid() == 0
        else f"error: cannot write to the run directory {tmp_path / 'ro' / 'tiny'} (run.output_dir / run.name): "
        "Permission denied"
    ]
    missing = tmp_path / "no-such-run"
    for resume in (missing, tmp_path):  # missing; a directory without any checkpoint
        done = subprocess.run(
            _train_cmd(*_sets(tiny_overrides(tmp_path / "out", digit_shards)), "--resume", str(resume)),
            env=_env(),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 2, done.stderr
        (line,) = done.stderr.strip().splitlines()  # before any model or tracker exists: nothing else logged
        assert line.startswith(f"config error: train.resume: {resume}") or line.startswith(
            f"config error: train.resume: no complete checkpoint at or under {resume}"
        ), line
    debug = subprocess.run(
        _train_cmd(*_sets(tiny_overrides(tmp_path / "out", digit_shards)), "--resume", str(missing), "--debug"),
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert debug.returncode == 1 and "Traceback" in debug.stderr  # --debug keeps it for developers
