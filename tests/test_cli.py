"""The `pretrain` command line as a user runs it: config checks, training, kNN evaluation, the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_config_command_prints_resolved_config(capsys):
    assert main(["config", str(REPO / "configs/mae_vit_b16.toml"), "--set", "optim.base_lr=3e-4"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["optim"]["base_lr"] == 3e-4 and resolved["model"]["size"] == "base"


def test_bad_override_exits_2_naming_the_key(capsys, tmp_path):
    code = main(
        [
            "train",
            str(REPO / "configs/mae_vit_tiny_digits.toml"),
            "--set",
            "optim.bas_lr=1",
            "--set",
            f'run.output_dir="{tmp_path}"',
        ]
    )
    assert code == 2
    assert "unknown key 'optim.bas_lr' (did you mean 'optim.base_lr'?)" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_demo_end_to_end_with_knn(tmp_path):
    """The README's demo command, shortened: shards, training, kNN of pretrained and random encoders."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": ""}
    env.pop("MLFLOW_TRACKING_URI")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "demo",
            "--out",
            str(tmp_path),
            "--steps",
            "8",
            "--set",
            "train.log_every=4",
            "--set",
            "eval.batch_size=512",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "kNN top-1, MAE-pretrained encoder:" in out.stdout
    assert "kNN top-1, random-init encoder:" in out.stdout
    assert "mlflow ui --backend-store-uri sqlite:///" in out.stdout
    result = json.loads((tmp_path / "mae_vit_tiny_digits" / "demo_result.json").read_text())
    assert result["steps"] == 8
    assert 0.1 < result["knn_top1_random_init"] <= 1.0  # 10 classes: far above chance even at random init
    assert (tmp_path / "mae_vit_tiny_digits" / "mlflow.db").is_file()

    # The same checkpoint through the eval command, as JSON.
    knn = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "eval",
            "knn",
            "--checkpoint",
            str(tmp_path / "mae_vit_tiny_digits"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert knn.returncode == 0, knn.stderr[-3000:]
    report = json.loads(knn.stdout)
    assert report["knn_top1"] == pytest.approx(result["knn_top1_pretrained"])
    assert report["num_train"] == 1437 and report["num_test"] == 360
