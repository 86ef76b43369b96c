"""The engine interface: everything the train loop needs that depends on how the model is run.

Model and method code never learn about devices, precision or parallelism; an engine applies
them from outside and the one train loop talks only to this interface.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from pretrain.config import Config
from pretrain.distributed import init_distributed
from pretrain.runtime.world import WorldInfo

OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


def resolve_device(spec: str, world: WorldInfo) -> torch.device:
    if spec == "cpu" or (spec == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("run.device: 'cuda' was requested but torch sees no CUDA device")
    return torch.device("cuda", world.local_rank % torch.cuda.device_count())


class Engine(ABC):
    name: str
    checkpoint_format: str = "dcp"  # what save_tensors writes; recorded in each checkpoint's meta.json
    supports_async_checkpoint: bool = False  # engines that implement save_tensors_async
    options: type | None = None  # the dataclass of engine.<name>, if the engine has settings of its own

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        """Checks of settings this engine cannot honour, before any work; messages name the key."""
        return None

    def __init__(self, cfg: Config, world: WorldInfo):
        self.cfg = cfg
        self.world = world
        self.device = resolve_device(cfg.run.device, world)
        precision = cfg.train.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        self.precision = precision
        init_distributed(world, self.device)

    def init_context(self) -> contextlib.AbstractContextManager:
        """Where the method's parameters are created (the meta device for engines that materialize shards)."""
        return contextlib.nullcontext()

    def accumulate(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        """Around one micro-step's forward/backward; engines skip gradient sync until the last one."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @abstractmethod
    def setup(self, method: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Place and wrap the method, then build its optimizer over the wrapped parameters.

        Returns the module the loop calls and the optimizer the schedule drives. Both come from one
        call because some engines (DeepSpeed) must create them together.
        """

    def backward(self, loss: torch.Tensor) -> None:
        """`loss` is already divided by the number of accumulation micro-steps."""
        loss.backward()

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Total gradient norm before clipping; clipping is skipped when max_norm is 0."""
        params = [p for p in model.parameters() if p.grad is not None]
        return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def full_parameters(self, model: nn.Module, module: nn.Module) -> contextlib.AbstractContextManager:
        """Around calls into a part of the method outside the training forward (evaluation, pictures):
        every parameter of `module` is whole on every rank. Every rank must enter it together."""
        return contextlib.nullcontext()

    @torch.no_grad()
    def ema_update(self, pairs: list[tuple[nn.Module, nn.Module]], momentum: float) -> None:
        """p_avg = m * p_avg + (1 - m) * p_online for every parameter of each (averaged, online) pair.

        Works on each rank's local piece of a parameter, so it needs no communication on any engine:
        twins of the same shape are sharded identically.
        """
        averaged, online = [], []
        for avg_module, online_module in pairs:
            avg_params, online_params = dict(avg_module.named_parameters()), dict(online_module.named_parameters())
            if avg_params.keys() != online_params.keys():
                raise ValueError(f"EMA pair {type(avg_module).__name__}: parameter names differ")
            for name, param in avg_params.items():
                averaged += self.local_tensors(param)
                online += self.local_tensors(online_params[name])
        if averaged:
            torch._foreach_lerp_(averaged, online, 1.0 - momentum)

    def local_tensors(self, param: nn.Parameter) -> list[torch.Tensor]:
        """The copies of `param` this rank stores (the whole tensor unless an engine shards it)."""
        return [param.data]

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop the gradients of a step that is skipped."""
        optimizer.zero_grad(set_to_none=True)

    @abstractmethod
    def save_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Write model and optimizer state into `directory` (every rank calls this)."""

    @abstractmethod
    def load_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        """Restore model and optimizer state written by `save_tensors`, at any world size the format allows."""
