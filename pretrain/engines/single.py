"""One process, one device: the engine the foundation runs on and the reference for the others."""

from __future__ import annotations

import torch
from torch import nn

from pretrain.engines.base import OptimizerFactory
from pretrain.engines.dcp import DCPEngine
from pretrain.engines.parallelize import prepare_blocks


class SingleEngine(DCPEngine):
    name = "single"

    def setup(self, method: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        if self.world.distributed:
            raise RuntimeError(f"engine.kind=single runs one process, but the launcher started {self.world.world_size}")
        prepare_blocks(method, self.cfg.engine.activation_checkpointing, self.cfg.engine.compile)
        model = method.to(self.device)
        return model, make_optimizer(model)
