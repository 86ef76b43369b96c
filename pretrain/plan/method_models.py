"""What the chosen method saves for backward and communicates by itself, from its spec: each method counts
these in its own file (pretrain/methods/<name>.py) from the building blocks of pretrain/activation_memory.py."""

from __future__ import annotations

from pretrain.activation_memory import Collective
from pretrain.config import Config
from pretrain.methods.registry import METHODS


def activations_per_sample(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    count = METHODS[cfg.method.name].activations
    if count is None:
        raise ValueError(
            f"method.name: the method '{cfg.method.name}' has no activation model (its spec's activations)"
        )
    return count(cfg, act, checkpointing)


def method_collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    collectives = METHODS[cfg.method.name].collectives
    return collectives(cfg, micro_batch, act) if collectives is not None else []


def averaged_network_runs_forward(cfg: Config) -> bool:
    runs = METHODS[cfg.method.name].averaged_network_runs_forward
    return runs(cfg) if callable(runs) else runs
