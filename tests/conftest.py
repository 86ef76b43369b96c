"""Shared fixtures: one real MLflow server and one set of tiny digit shards for the whole session."""

from __future__ import annotations

import os

# Triton reads TRITON_INTERPRET once, when it is first imported, and DeepSpeed imports it early: set it
# before anything else so the kernel tests run through the interpreter on this CPU-only suite.
os.environ.setdefault("TRITON_INTERPRET", "1")

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import DIGITS_CLASSES, digits_samples

from mlflow_server import free_port, mlflow_server


@pytest.fixture
def one_thread() -> Iterator[None]:
    """For modules of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): with the 2 cores
    shared, a second intra-op thread only adds waiting. Restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Callable[[str], Path]]:
    """`mktemp` for a module's fixtures (trained runs, checkpoints), removed once the module's tests are done, unless
    one of them failed: the suite writes several GB of checkpoints, more than a CI machine's disk may have free at
    once. Each test's own tmp_path goes when it passes (pyproject: tmp_path_retention_policy)."""
    made: list[Path] = []
    failed_before = request.session.testsfailed

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    started = time.monotonic()
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port()) as url:
        print(f"mlflow server ready in {time.monotonic() - started:.1f}s")
        yield url


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real digits at 16 px in 23 train shards of 64 (and 6 test shards)."""
    out = tmp_path_factory.mktemp("digits")
    write_shards(digits_samples(16), out, shard_size=64, classes=DIGITS_CLASSES, image_size=16)
    return out


@pytest.fixture(scope="session")
def engine_runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case of tests/engine_runs.py at 2 ranks, from one torchrun (see there)."""
    import torch
    from engine_runs import CASES, runnable

    from test_engines import REPO, torchrun

    out = tmp_path_factory.mktemp("engine-runs") / "runs.pt"
    runs = [run for run, _ in CASES.values() if runnable(run)]
    torchrun(2, [str(REPO / "tests/dist_engine_runs.py"), str(out), *runs])
    results = torch.load(out)
    out.unlink()  # hundreds of MB, held in memory from here
    return results
