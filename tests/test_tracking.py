"""Tracker against real MLflow: a server process, a local sqlite store, a dead port, a slow server."""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from pretrain.tracking import (
    Tracker,
    flatten_config,
    local_tracking_uri,
    resolve_tracking_uri,
)

from mlflow_server import free_port, mlflow_server

_ENV_THE_TRACKER_SETS = (
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES",
    "MLFLOW_HTTP_REQUEST_TIMEOUT",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT",
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ambient tracking URI, and the Tracker's env defaults don't leak into other tests."""
    for name in ("MLFLOW_TRACKING_URI", *_ENV_THE_TRACKER_SETS):
        monkeypatch.delenv(name, raising=False)


class _GatedProxy(ThreadingHTTPServer):
    """Forwards to a real server but holds every request until `gate` opens: a stalled server."""

    daemon_threads = True

    def __init__(self, target: str) -> None:
        self.target, self.gate, self.arrived = target, threading.Event(), threading.Event()
        super().__init__(("127.0.0.1", 0), _ForwardingHandler)


class _ForwardingHandler(BaseHTTPRequestHandler):
    server: _GatedProxy

    def _forward(self) -> None:
        self.server.arrived.set()
        self.server.gate.wait(30)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        skip = ("host", "content-length", "connection")
        headers = {k: v for k, v in self.headers.items() if k.lower() not in skip}
        url = self.server.target + self.path
        request = urllib.request.Request(url, body or None, headers, method=self.command)
        try:
            with urllib.request.urlopen(request, timeout=30) as resp:
                status, data = resp.status, resp.read()
        except urllib.error.HTTPError as err:
            status, data = err.code, err.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _forward

    def log_message(self, *args: object) -> None:
        pass


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "pretrain.tracking" and r.levelno == logging.WARNING and text in r.getMessage()
    ]


def test_flatten_config_and_uri_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = {"optim": {"lr": 3e-4, "betas": (0.9, 0.95)}, "model": {"vit": {"depth": 12}}, "ckpt": None}
    assert flatten_config(cfg) == {
        "optim.lr": "0.0003",
        "optim.betas": "(0.9, 0.95)",
        "model.vit.depth": "12",
        "ckpt": "None",
    }
    local = local_tracking_uri(tmp_path)
    assert local == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert resolve_tracking_uri("", tmp_path) == local
    assert resolve_tracking_uri("http://tracking:5000", tmp_path) == "http://tracking:5000"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://from-env:5000")
    assert resolve_tracking_uri("http://tracking:5000", tmp_path) == "http://from-env:5000"


def test_disabled_tracker_is_a_noop() -> None:
    threads_before = set(threading.enumerate())
    tracker = Tracker("http://127.0.0.1:1", "exp", "run", enabled=False)
    tracker.log_params({"a": 1})
    tracker.log_metrics({"loss": 1.0}, step=0)
    tracker.log_image(np.zeros((4, 4, 3), np.uint8), "x", 0)
    assert tracker.flush(timeout=0) is True
    tracker.close()
    assert tracker.run_id is None and not set(threading.enumerate()) - threads_before
    assert "MLFLOW_HTTP_REQUEST_MAX_RETRIES" not in os.environ


@pytest.mark.slow
def test_params_metrics_tags_and_artifacts_reach_the_server(server: str, tmp_path: Path) -> None:
    image = torch.randint(0, 256, (16, 12, 3), dtype=torch.uint8)
    config_file = tmp_path / "config.toml"
    config_file.write_text("[optim]\nlr = 3e-4\n")
    tracker = Tracker(server, "exp-basic", "run-a", tags={"method": "mae"}, flush_interval=0.2)
    tracker.log_params(flatten_config({"optim": {"lr": 3e-4}, "notes": "x" * 7000, "bad[key]": 1}))
    for step in range(50):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 1e-3}, step=step)
    tracker.log_image(image, "recon", step=40)
    tracker.log_artifact_file(str(config_file))
    tracker.set_tags({"phase": "pretrain"})
    tracker.close(timeout=60)

    client = MlflowClient(server)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run-a"
    assert run.data.params["optim.lr"] == "0.0003" and len(run.data.params["notes"]) == 6000
    assert "bad[key]" not in run.data.params
    assert run.data.tags["method"] == "mae" and run.data.tags["phase"] == "pretrain"
    history = sorted(client.get_metric_history(tracker.run_id, "train/loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(50))
    assert [m.value for m in history] == pytest.approx([1.0 / (s + 1) for s in range(50)])
    assert {a.path for a in client.list_artifacts(tracker.run_id)} == {"config.toml", "images"}
    png = client.download_artifacts(tracker.run_id, "images/recon_step00000040.png", str(tmp_path))
    np.testing.assert_array_equal(np.asarray(Image.open(png)), image.numpy())
    assert tracker.ui_hint() == f"{server}/#/experiments/{run.info.experiment_id}/runs/{tracker.run_id}"


@pytest.mark.slow
def test_resume_continues_the_same_run_and_step_axis(server: str, caplog: pytest.LogCaptureFixture) -> None:
    first = Tracker(server, "exp-resume", "job", flush_interval=0.2)
    first.log_params({"optim.lr": 0.1})
    for step in range(10):
        first.log_metrics({"loss": float(step)}, step=step)
    first.close(timeout=60, status="KILLED")  # e.g. preempted
    run_id = first.run_id
    assert run_id is not None

    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    second = Tracker(server, "exp-resume", "job", run_id=run_id, flush_interval=0.2)
    assert second.run_id == run_id
    second.log_params({"optim.lr": 0.1, "batch_size": 4})  # same value again: fine
    second.log_params({"optim.lr": 0.2})  # edited config on resume: warned and skipped
    for step in range(10, 20):
        second.log_metrics({"loss": float(step)}, step=step)
    assert second.flush(timeout=60)
    client = MlflowClient(server)
    assert client.get_run(run_id).info.status == "RUNNING"
    second.close(timeout=60)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"optim.lr": "0.1", "batch_size": "4"}
    assert _steps(client, run_id, "loss") == list(range(20))
    assert len(client.search_runs([run.info.experiment_id])) == 1
    assert len(_warnings(caplog, "already")) == 1 and not _warnings(caplog, "rejected")


@pytest.mark.slow
def test_resuming_an_unknown_run_starts_a_new_one(server: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    with pytest.raises(RuntimeError), Tracker(server, "exp-gone", "job", run_id="0" * 32) as tracker:
        tracker.log_metrics({"loss": 1.0}, step=100)
        assert tracker.flush(timeout=60)
        raise RuntimeError("training crashed")
    assert tracker.run_id not in (None, "0" * 32)
    assert len(_warnings(caplog, "not found")) == 1
    run = MlflowClient(server).get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.metrics == {"loss": 1.0}


def test_job_key_continues_a_run_whose_id_was_never_saved(server: str) -> None:
    """A job that died before checkpointing its run id finds its run again by the job key."""
    first = Tracker(server, "exp-job", "job", job_key="job-123", flush_interval=0.2)
    first.log_metrics({"loss": 1.0}, step=1)
    first.close(status="KILLED")
    other = Tracker(server, "exp-job", "job", job_key="another-job", flush_interval=0.2)
    other.log_metrics({"loss": 9.0}, step=1)
    other.close()
    second = Tracker(server, "exp-job", "job", job_key="job-123", flush_interval=0.2)  # no run_id
    second.log_metrics({"loss": 0.5}, step=2)
    second.close()
    assert second.run_id == first.run_id != other.run_id
    client = MlflowClient(server)
    assert _steps(client, first.run_id, "loss") == [1, 2]
    assert client.get_run(first.run_id).data.tags["pretrain.job_key"] == "job-123"


def test_dead_server_never_blocks_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    tracker = Tracker(f"http://127.0.0.1:{free_port()}", "exp", "run", flush_interval=0.05)
    started = time.perf_counter()
    for step in range(200):
        tracker.log_metrics({"loss": 1.0, "lr": 0.1}, step=step)
    tracker.log_image(np.zeros((8, 8, 3), np.uint8), "sample", step=0)
    assert time.perf_counter() - started < 0.5
    assert tracker.flush(timeout=1.5) is False  # retried at least twice meanwhile
    started = time.perf_counter()
    tracker.close(timeout=1.0)
    assert time.perf_counter() - started < 1.5
    assert tracker.run_id is None
    assert len(_warnings(caplog, "retrying in the background")) == 1
    assert len(_warnings(caplog, "gave up")) == 1


def test_backlog_is_bounded_and_drops_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pretrain.tracking")
    dead = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker(dead, "exp", "run", flush_interval=0.05, max_backlog=100)
    for step in range(250):
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.dropped_metrics == 150
    assert len(_warnings(caplog, "dropping the oldest")) == 1
    tracker.close(timeout=0.2)


@pytest.mark.slow
def test_backlog_is_delivered_once_the_server_comes_up(tmp_path: Path) -> None:
    port = free_port()
    tracker = Tracker(f"http://127.0.0.1:{port}", "exp-late", "run", flush_interval=0.05)
    tracker.log_params({"optim.lr": 0.1})
    for step in range(1500):  # more than one log_batch call's worth
        tracker.log_metrics({"loss": float(step)}, step=step)
    assert tracker.flush(timeout=0.5) is False
    with mlflow_server(tmp_path / "late", port) as url:
        assert tracker.flush(timeout=60) is True
        client = MlflowClient(url)
        assert tracker.run_id is not None
        assert _steps(client, tracker.run_id, "loss") == list(range(1500))
        assert client.get_run(tracker.run_id).data.params == {"optim.lr": "0.1"}
        tracker.close(timeout=30)
        assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_local_sqlite_store_needs_no_server(tmp_path: Path) -> None:
    uri = local_tracking_uri(tmp_path)
    with Tracker(uri, "exp-local", "laptop", flush_interval=0.2) as tracker:
        for step in range(5):
            tracker.log_metrics({"loss": float(step)}, step=step)
        tracker.log_image(np.full((8, 8), 7, np.uint8), "digit", step=4)
    assert tracker.ui_hint() == f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db"
    client = MlflowClient(uri)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert _steps(client, tracker.run_id, "loss") == list(range(5))
    artifacts = tmp_path / "mlartifacts" / tracker.run_id / "artifacts"
    assert (artifacts / "images" / "digit_step00000004.png").is_file()


@pytest.mark.slow
def test_logging_does_not_block_while_a_send_is_stuck(server: str) -> None:
    proxy = _GatedProxy(server)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        slow = f"http://127.0.0.1:{proxy.server_port}"
        tracker = Tracker(slow, "exp-slow", "run", flush_interval=0.05)
        tracker.log_metrics({"loss": 0.0}, step=0)
        assert proxy.arrived.wait(10)  # the worker is now inside an HTTP request that won't answer
        latencies = []
        for step in range(1, 501):
            started = time.perf_counter()
            tracker.log_metrics({"loss": float(step)}, step=step)
            latencies.append(time.perf_counter() - started)
        assert sum(latencies) < 0.5 and max(latencies) < 0.1
        proxy.gate.set()
        assert tracker.flush(timeout=60)
        tracker.close(timeout=30)
        assert _steps(MlflowClient(server), tracker.run_id, "loss") == list(range(501))
    finally:
        proxy.gate.set()
        proxy.shutdown()
        proxy.server_close()
