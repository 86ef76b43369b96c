"""Against a real MLflow server: system metrics reach the run under system/ (through the Tracker, so they
share its background delivery), from a training run when tracking.system_metrics is on and not when it
is off, and experiments carry the tag that makes MLflow 3's UI open them as model training."""

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pretrain.recipes import load_config
from pretrain.tracking import Tracker
from pretrain.tracking.system_metrics import SystemMetrics
from pretrain.tracking.worker import EXPERIMENT_TAGS
from pretrain.train import Trainer

from tiny import tiny_overrides


def test_experiments_are_tagged_as_model_training(server: str) -> None:
    client = MlflowClient(server)
    with Tracker(server, "exp-kind-new", "run", flush_interval=0.2) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert tracker.flush(30)
    assert client.get_experiment_by_name("exp-kind-new").tags["mlflow.experimentKind"] == "custom_model_development"

    untagged = client.create_experiment("exp-kind-old")  # made before the tag existed, or by hand
    with Tracker(server, "exp-kind-old", "run", flush_interval=0.2) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)  # the run (and its experiment) is made on first contact
        assert tracker.flush(30)
    assert client.get_experiment(untagged).tags.items() >= EXPERIMENT_TAGS.items()
    kept = client.create_experiment("exp-kind-chosen", tags={"mlflow.experimentKind": "genai_development"})
    with Tracker(server, "exp-kind-chosen", "run", flush_interval=0.2) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=0)
        assert tracker.flush(30)
    assert client.get_experiment(kept).tags["mlflow.experimentKind"] == "genai_development"  # a choice is kept


def test_system_metrics_are_sampled_into_the_run(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")
    steps = iter(range(1000))
    with Tracker(server, "exp-system", "run", flush_interval=0.2) as tracker:
        sampler = SystemMetrics(tracker, lambda: next(steps)).start()
        sample = sampler.sample()
        assert sample["system/cpu_utilization_percentage"] >= 0 and sample["system/system_memory_usage_megabytes"] > 0
        time.sleep(0.3)  # a few sampling intervals
        sampler.stop()  # logs a last sample
        assert tracker.flush(30)
    history = MlflowClient(server).get_metric_history(tracker.run_id, "system/system_memory_usage_megabytes")
    assert len(history) >= 2 and all(m.value > 0 for m in history)
    assert [m.step for m in history] == sorted(m.step for m in history)


@pytest.mark.parametrize("enabled", [True, False])
def test_training_run_logs_system_metrics_when_switched_on(
    server: str, tmp_path: Path, digit_shards: Path, monkeypatch: pytest.MonkeyPatch, enabled: bool
) -> None:
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    overrides = tiny_overrides(
        tmp_path, digit_shards, f"tracking.uri={server}", "tracking.experiment=exp-system-train", "train.steps=2"
    )
    cfg = load_config(None, [*overrides, f"tracking.system_metrics={str(enabled).lower()}", "train.vis_every=0"])
    result = Trainer(cfg).fit(save_final=False)
    keys = MlflowClient(server).get_run(result.mlflow_run_id).data.metrics.keys()
    assert "loss" in keys
    assert ("system/cpu_utilization_percentage" in keys) == enabled
