"""Where this process sits in the job, read from the launcher's environment.

torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; `srun` without torchrun sets SLURM_PROCID/SLURM_NTASKS/
SLURM_LOCALID. A plain `python` process is rank 0 of 1.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


@dataclass(frozen=True)
class WorldInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    launcher: str = "none"  # none | torchrun | slurm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_env(env: dict[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world_from_env(env: dict[str, str] | None = None) -> WorldInfo:
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        info = WorldInfo(
            _int_env(env, "RANK"),
            _int_env(env, "WORLD_SIZE"),
            _int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            "torchrun",
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        info = WorldInfo(
            _int_env(env, "SLURM_PROCID"),
            _int_env(env, "SLURM_NTASKS"),
            _int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            "slurm",
        )
    else:
        return WorldInfo()
    if not 0 <= info.rank < info.world_size:
        raise ValueError(f"rank {info.rank} is outside world size {info.world_size} ({info.launcher} environment)")
    return info


def host_tags(world: WorldInfo) -> dict[str, str]:
    """Tags every tracked run carries, so a run can be traced back to its machines and job."""
    tags = {"host": socket.gethostname(), "world_size": str(world.world_size), "launcher": world.launcher}
    if "SLURM_JOB_ID" in os.environ:
        tags["slurm_job_id"] = os.environ["SLURM_JOB_ID"]
    return tags
