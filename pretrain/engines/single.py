"""One process, one device: the engine the foundation runs on and the reference for the others."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain.engines.base import Engine


class SingleEngine(Engine):
    name = "single"

    def prepare(self, method: nn.Module) -> nn.Module:
        if self.world.distributed:
            raise RuntimeError(f"engine.kind=single runs one process, but the launcher started {self.world.world_size}")
        return method.to(self.device)

    def tensor_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_tensor_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
