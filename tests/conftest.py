"""Shared fixtures: one real MLflow server for the whole session."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from mlflow_server import free_port, mlflow_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    started = time.monotonic()
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server"), free_port()) as url:
        print(f"mlflow server ready in {time.monotonic() - started:.1f}s")
        yield url
