"""The engine interface: everything the train loop needs that depends on how the model is run.

Model and method code never learn about devices, precision or parallelism; an engine applies
them from outside and the one train loop talks only to this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from launch.env import WorldInfo
from pretrain.config import Config


def resolve_device(spec: str, world: WorldInfo) -> torch.device:
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device: 'cuda' was requested but torch sees no CUDA device")
    return torch.device("cuda", world.local_rank % torch.cuda.device_count())


class Engine(ABC):
    name: str

    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg = cfg
        self.world = world
        self.device = resolve_device(cfg.run.device, world)
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def prepare(self, method: nn.Module) -> nn.Module:
        """Place (and wrap) the method's networks; returns the module to call in the loop."""

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Total gradient norm before clipping; clipping is skipped when max_norm is 0."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def tensor_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """Model and optimizer state in the form DCP saves and loads in place."""

    @abstractmethod
    def load_tensor_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Apply a state filled by DCP to the live model and optimizer."""
