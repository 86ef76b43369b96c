"""`pretrain launch local`: torchrun on this machine (standalone rendezvous) running `pretrain train`.

Each rank's stdout and stderr go to the run directory (torchrun's --log-dir, teed to the console),
next to the per-rank log files the training process writes itself (logs/rank_NNNNN.log), so a
traceback that never reaches Python logging is kept too.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from pretrain.recipes import load_config


def train_args(config_path: str | Path, overrides: list[str]) -> list[str]:
    """`-m pretrain.cli train CONFIG --set ...`: the one training entry point every launcher runs."""
    sets = [item for override in overrides for item in ("--set", override)]
    return ["-m", "pretrain.cli", "train", str(config_path), *sets]


def local_command(config_path: str | Path, overrides: list[str], nproc: int, log_dir: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        f"--log-dir={log_dir}",
        "--redirects=3",
        "--tee=3",
        *train_args(config_path, overrides),
    ]


def launch_local(config_path: str | Path, overrides: list[str], nproc: int) -> int:
    cfg = load_config(config_path, overrides)  # a bad config fails here, before any process starts
    cmd = local_command(config_path, overrides, nproc, cfg.run_dir.resolve() / "logs" / "torchrun")
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)
