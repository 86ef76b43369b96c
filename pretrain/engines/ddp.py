"""Data parallel: every rank holds the whole model; gradients are averaged by DDP's bucketed all-reduce."""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain.engines.base import OptimizerFactory
from pretrain.engines.dcp import DCPEngine
from pretrain.engines.parallelize import prepare_blocks


class DDPEngine(DCPEngine):
    name = "ddp"

    def setup(self, method: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        prepare_blocks(method, self.cfg.engine.activation_checkpointing, self.cfg.engine.compile)
        method.to(self.device)
        # A method with players leaves the others' parameters out of a player's pass (a GAN's generator runs
        # without grad in the discriminator's): DDP must then find the unused ones every pass.
        model = DistributedDataParallel(
            method,
            device_ids=[self.device] if self.device.type == "cuda" else None,
            find_unused_parameters=bool(method.players()),
        )
        # The optimizer groups parameters by the method's own names (no "module." prefix), like every engine.
        return model, make_optimizer(method)

    def accumulate(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last_micro_step else model.no_sync()
