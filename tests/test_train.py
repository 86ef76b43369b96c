"""End to end on CPU: train from digit shards, resume bit-identically, survive bad data and NaNs,
and keep tracking in one MLflow run across a resume."""

from __future__ import annotations

import copy
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from data_pipeline.reader import ShardFailure, read_shard
from pretrain.checkpoint import read_meta
from pretrain.config import ConfigError
from pretrain.methods.mae import MaskedAutoencoder
from pretrain.recipes import load_config
from pretrain.train import NonFiniteLossError, Trainer

from mlflow_server import free_port
from tiny import assert_equal_states, tiny_overrides


def tiny_config(tmp_path: Path, shards: Path, *overrides: str):
    return load_config(None, tiny_overrides(tmp_path, shards, "tracking.flush_interval=0.2", *overrides))


def checkpoint_tensors(path: Path, like: Trainer) -> dict:
    """Model and optimizer state of a checkpoint, loaded into `like`'s live objects and read back."""
    like.engine.load_tensors(like.model, like.optimizer, path)
    return copy.deepcopy({"model": like.model.state_dict(), "optim": like.optimizer.state_dict()})


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, digit_shards, server, workers):
    """6 steps straight == 3 steps, a fresh process state resumed from the checkpoint, 3 more steps."""
    straight_cfg = tiny_config(
        tmp_path / "straight", digit_shards, f"data.num_workers={workers}", "tracking.enabled=false"
    )
    straight = Trainer(straight_cfg)
    full = straight.fit()

    cfg = tiny_config(tmp_path / "split", digit_shards, f"data.num_workers={workers}", f'tracking.uri="{server}"')
    first = Trainer(cfg).fit(until=3)
    assert first.step == 3 and read_meta(first.checkpoint)["step"] == 3
    resumed_trainer = Trainer(cfg)  # train.resume=auto finds step 3
    assert resumed_trainer.step == 3
    second = resumed_trainer.fit()

    assert first.losses + second.losses == full.losses  # exact float equality, step by step
    assert_equal_states(
        checkpoint_tensors(second.checkpoint, straight), checkpoint_tensors(full.checkpoint, straight), "state"
    )

    # One MLflow run across the interruption, its step axis continuing.
    assert first.mlflow_run_id and second.mlflow_run_id == first.mlflow_run_id
    client = MlflowClient(server)
    history = client.get_metric_history(first.mlflow_run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(full.losses)
    assert client.get_run(first.mlflow_run_id).data.params["model.size"] == "tiny"


def _nan_on_call(monkeypatch, bad_call: int) -> None:
    original = MaskedAutoencoder.forward
    calls = {"n": 0}

    def forward(self, batch):
        calls["n"] += 1
        out = original(self, batch)
        if calls["n"] == bad_call:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(MaskedAutoencoder, "forward", forward)


def test_nonfinite_loss_stops_with_checkpoint_of_last_good_state(tmp_path, digit_shards, monkeypatch):
    clean = Trainer(tiny_config(tmp_path / "clean", digit_shards, "tracking.enabled=false")).fit(until=2)
    _nan_on_call(monkeypatch, bad_call=3)
    trainer = Trainer(tiny_config(tmp_path / "nan", digit_shards, "tracking.enabled=false"))
    with pytest.raises(NonFiniteLossError, match="non-finite training signal at step 3.*checkpointed"):
        trainer.fit()
    saved = trainer.checkpoints.latest()
    assert read_meta(saved)["step"] == 2
    # The checkpoint holds exactly the state after the two good steps (no update from the bad one).
    assert_equal_states(checkpoint_tensors(saved, trainer), checkpoint_tensors(clean.checkpoint, trainer))


def test_nonfinite_loss_skip_policy_drops_the_step(tmp_path, digit_shards, monkeypatch):
    _nan_on_call(monkeypatch, bad_call=3)
    cfg = tiny_config(tmp_path, digit_shards, "tracking.enabled=false", "train.on_nonfinite=skip")
    result = Trainer(cfg).fit()
    assert result.step == 6 and result.skipped_steps == 1 and len(result.losses) == 6
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_corrupt_shard_is_skipped_and_counted(tmp_path, digit_shards, caplog):
    shards = tmp_path / "shards"
    shutil.copytree(digit_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[0]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])  # truncated mid-member
    # 23 shards of 64 digits: 190 batches of 8 cover more than one epoch, so the victim is read.
    cfg = tiny_config(
        tmp_path,
        shards,
        "tracking.enabled=false",
        "train.steps=190",
        "train.log_every=50",
        "data.batch_size=8",
        "data.shuffle_buffer=0",
        "method.mae.mask_ratio=0.9",
    )
    readable = sum(1 for item in read_shard(str(victim)) if not isinstance(item, ShardFailure))
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        trainer = Trainer(cfg)
        result = trainer.fit()
    assert result.step == 190
    # The manifest knows the shard's 64 samples: the unread rest of it counts, not one event.
    lost = 64 - readable
    assert 0 < readable < 64 and (trainer.loader.skipped_total, trainer.loader.skipped_shards_total) == (lost, 1)
    last = json.loads((cfg.run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert (last["data_skipped_samples"], last["data_skipped_shards"]) == (lost, 1)
    (warning,) = [r.getMessage() for r in caplog.records if str(victim) in r.getMessage()]
    assert f"{lost} samples lost" in warning and "after sample 'digits-" in warning


def test_unreachable_tracking_server_does_not_stop_training(tmp_path, digit_shards, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = tiny_config(tmp_path, digit_shards, f'tracking.uri="{dead}"', "tracking.close_timeout=1.0")
    with caplog.at_level(logging.WARNING, logger="pretrain.tracking"):
        result = Trainer(cfg).fit()
    assert result.step == 6 and result.checkpoint is not None
    assert any("cannot reach MLflow" in r.getMessage() for r in caplog.records)


def test_bad_data_spec_fails_before_any_work(tmp_path):
    cfg = load_config(None, [f'run.output_dir="{tmp_path}"', f'data.shards="{tmp_path / "nope"}"'])
    with pytest.raises(ConfigError, match="data.shards"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())  # no run directory, no logs, no checkpoint


def test_resume_refuses_a_changed_network(tmp_path, digit_shards):
    Trainer(tiny_config(tmp_path, digit_shards, "tracking.enabled=false")).fit(until=1)
    changed = tiny_config(tmp_path, digit_shards, "tracking.enabled=false", "method.mae.decoder_depth=2")
    with pytest.raises(ConfigError, match=r"method.mae.decoder_depth: 1 -> 2 \(the network changed\)"):
        Trainer(changed)


def test_async_checkpoints_equal_synchronous_ones(tmp_path, digit_shards):
    common = ("tracking.enabled=false", "train.ckpt_every=2", "train.keep_last=5")
    sync = Trainer(tiny_config(tmp_path / "sync", digit_shards, *common)).fit()
    trainer = Trainer(tiny_config(tmp_path / "async", digit_shards, *common, "train.async_checkpoint=true"))
    background = trainer.fit()
    assert background.losses == sync.losses
    assert [read_meta(p)["step"] for p in trainer.checkpoints.list()] == [2, 4, 6]
    for step in (2, 4, 6):
        written = checkpoint_tensors(trainer.checkpoints.step_dir(step), trainer)
        reference = checkpoint_tensors(tmp_path / "sync" / "tiny" / "checkpoints" / f"step_{step:08d}", trainer)
        assert_equal_states(written, reference, f"step {step}")
