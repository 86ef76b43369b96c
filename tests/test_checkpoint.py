"""Atomic checkpoints: a kill mid-write never damages the last good one; pruning and discovery."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import (
    CheckpointManager,
    dcp_load,
    dcp_save,
    is_complete,
    load_rank_state,
    read_meta,
    resolve_resume,
)
from pretrain.config import ConfigError


def _tensors(step: int, numel: int = 1000) -> dict:
    return {"model": {"w": torch.full((numel,), float(step)), "b": torch.arange(5) + step}}


def _writer(step: int):
    return lambda directory: dcp_save(_tensors(step), directory)


def test_save_load_round_trip(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    path = mgr.save(3, _writer(3), {"rng": [1, 2]}, {"engine": "single", "mlflow_run_id": "abc"})
    assert is_complete(path) and mgr.latest() == path
    meta = read_meta(path)
    assert meta["step"] == 3 and meta["engine"] == "single" and meta["mlflow_run_id"] == "abc"
    target = _tensors(0)
    dcp_load(target, path)
    assert torch.equal(target["model"]["w"], _tensors(3)["model"]["w"])
    assert torch.equal(target["model"]["b"], _tensors(3)["model"]["b"])
    assert load_rank_state(path, 0) == {"rng": [1, 2]}
    assert load_rank_state(path, 1) is None


def test_keep_last_prunes_oldest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        mgr.save(step, _writer(step), {}, {})
    assert [read_meta(p)["step"] for p in mgr.list()] == [3, 4]
    assert (tmp_path / "latest").read_text().strip() == "step_00000004"


def test_a_fresh_run_never_prunes_what_it_just_wrote_over_an_earlier_runs_later_steps(tmp_path):
    earlier = CheckpointManager(tmp_path, keep_last=2)
    for step in (10, 20):
        earlier.save(step, _writer(step), {}, {})
    fresh = CheckpointManager(tmp_path, keep_last=2)  # the same run directory, train.resume=none
    for step in (5, 7, 9):
        written = fresh.save(step, _writer(step), {}, {})
        assert is_complete(written) and fresh.latest() == written
    assert [read_meta(p)["step"] for p in fresh.list()] == [7, 9, 10, 20]


def test_latest_falls_back_when_marker_points_to_damaged(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(1, _writer(1), {}, {})
    second = mgr.save(2, _writer(2), {}, {})
    (second / "meta.json").unlink()  # damaged by hand
    assert mgr.latest() == mgr.step_dir(1)
    assert resolve_resume("auto", mgr) == mgr.step_dir(1)
    assert resolve_resume("none", mgr) is None
    assert resolve_resume(str(tmp_path), mgr) == mgr.step_dir(1)
    with pytest.raises(ConfigError, match=r"train.resume: .* is an incomplete checkpoint \(missing meta.json\)"):
        resolve_resume(str(second), mgr)
    with pytest.raises(ConfigError, match="train.resume: .*no such file or directory"):
        resolve_resume(str(tmp_path / "missing"), mgr)


def test_resave_same_step_replaces(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=3)
    mgr.save(5, _writer(5), {}, {"tag": "first"})
    mgr.save(5, _writer(5), {}, {"tag": "second"})
    assert read_meta(mgr.step_dir(5))["tag"] == "second"
    assert len(mgr.list()) == 1


WRITER = textwrap.dedent(
    """
    import sys, torch
    from pretrain.checkpoint import CheckpointManager, dcp_save
    mgr = CheckpointManager(sys.argv[1], keep_last=2)
    step = 0
    while True:
        step += 1
        # ~64 MB per checkpoint so that a write takes long enough to be interrupted
        mgr.save(step, lambda d: dcp_save({"model": {"w": torch.full((16_000_000,), float(step))}}, d), {"step": step}, {})
        print(step, flush=True)
    """
)


def test_kill_during_write_keeps_previous_checkpoint(tmp_path):
    """SIGKILL a process while it writes a checkpoint; the previous one must still load exactly."""
    root = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], stdout=subprocess.PIPE, env=env, text=True)
        try:
            assert proc.stdout.readline().strip().isdigit()  # this process finished one save
            deadline = time.time() + 60
            while time.time() < deadline and not any(root.glob(".tmp-step_*/*.distcp")):
                time.sleep(0.002)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        if any(root.glob(".tmp-step_*")):
            break  # the kill landed inside a write, which is the case under test
    else:
        pytest.fail("never managed to kill the writer during a checkpoint write")

    mgr = CheckpointManager(root, keep_last=2)
    latest = mgr.latest()
    assert latest is not None and is_complete(latest)
    step = read_meta(latest)["step"]
    target = {"model": {"w": torch.zeros(16_000_000)}}
    dcp_load(target, latest)
    assert torch.equal(target["model"]["w"], torch.full((16_000_000,), float(step)))
    assert load_rank_state(latest, 0) == {"step": step}
    # The interrupted write is not mistaken for a checkpoint, and the next save clears it.
    assert all(p.name.startswith("step_") for p in mgr.list())
    nxt = mgr.save(step + 1, lambda d: dcp_save({"model": {"w": torch.zeros(4)}}, d), {}, {})
    assert mgr.latest() == nxt and json.loads((nxt / "meta.json").read_text())["step"] == step + 1
    assert not any(root.glob(".tmp-step_*"))
