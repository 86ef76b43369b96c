"""`pretrain launch accelerate`: an accelerate config in the run directory, then
`accelerate launch --config_file ... -m pretrain.cli train ...`.

accelerate only starts the processes (through torchrun). Our own code picks the engine and the
device from the config and reads the environment accelerate's torchrun sets (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). The config therefore uses accelerate's MULTI_GPU launcher
on CPU machines as well: its MULTI_CPU type starts a single process unless mpirun is set up.
With --deepspeed the config is accelerate's DEEPSPEED type and the run uses engine.kind=deepspeed.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from launch.local import train_args
from pretrain.config import Config
from pretrain.recipes import load_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(cfg: Config, nproc: int, port: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "MULTI_GPU",
        "num_machines": 1,
        "machine_rank": 0,
        "num_processes": nproc,
        "main_process_ip": "127.0.0.1",
        "main_process_port": port,
        "rdzv_backend": "static",
        "same_network": True,
        "mixed_precision": "no",  # train.precision decides, inside our engine
        "use_cpu": False,
        "gpu_ids": "all",
    }
    if cfg.engine.kind == "deepspeed":
        config["distributed_type"] = "DEEPSPEED"
        config["deepspeed_config"] = {
            "zero_stage": cfg.engine.deepspeed.zero_stage,
            "deepspeed_multinode_launcher": "standard",
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": False,
        }
    return config


def _accelerate_executable() -> list[str]:
    beside = Path(sys.executable).with_name("accelerate")
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("accelerate")
    if found is None:
        raise FileNotFoundError("accelerate is not installed: pip install accelerate")
    return [found]


def launch_accelerate(config_path: str | Path, overrides: list[str], nproc: int, deepspeed: bool = False) -> int:
    overrides = [*overrides, "engine.kind=deepspeed"] if deepspeed else list(overrides)
    cfg = load_config(config_path, overrides)  # a bad config fails here, before any process starts
    run_dir = cfg.run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    config_file = run_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(accelerate_config(cfg, nproc, _free_port()), sort_keys=False))
    cmd = [*_accelerate_executable(), "launch", "--config_file", str(config_file), *train_args(config_path, overrides)]
    print("+ " + shlex.join(cmd), flush=True)
    return subprocess.call(cmd)
