"""The base of the engines whose checkpoints are torch state dicts written with DCP (single, ddp, fsdp)."""

from __future__ import annotations

from concurrent.futures import Future
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain.checkpoint import dcp_async_save, dcp_load, dcp_save
from pretrain.engines.base import Engine


class DCPEngine(Engine):
    """Engines whose model and optimizer state is a (possibly sharded) torch state dict saved with DCP.

    `get_state_dict` gives the same fully-qualified names for a plain module, DDP and FSDP2, so a
    checkpoint written by any of them loads into any other, at any world size.
    """

    checkpoint_format = "dcp"
    supports_async_checkpoint = True
    _checkpoint_group = None

    def save_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        dcp_save({"model": model_state, "optim": optim_state}, directory)

    def save_tensors_async(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> Future:
        """Stage the state in CPU memory, then write it on a background thread; returns the write's future."""
        if self._checkpoint_group is None and dist.is_initialized():
            # The writer thread's collectives get their own gloo group, never interleaving with training's.
            self._checkpoint_group = dist.new_group(backend="gloo")
        model_state, optim_state = get_state_dict(model, optimizer)
        return dcp_async_save({"model": model_state, "optim": optim_state}, directory, self._checkpoint_group)

    def load_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        model_state, optim_state = get_state_dict(model, optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp_load(state, directory)
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
