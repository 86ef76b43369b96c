"""FSDP2: parameters, gradients and optimizer state sharded across ranks, one `fully_shard` per block."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from pretrain.config import Config, ConfigError
from pretrain.engines.base import OptimizerFactory, resolve_device
from pretrain.engines.dcp import DCPEngine
from pretrain.engines.parallelize import prepare_blocks
from pretrain.runtime.world import WorldInfo


@dataclass
class FSDPOptions:
    """engine.fsdp"""

    # Free gathered parameters after forward (less memory, one more all-gather in backward).
    reshard_after_forward: bool = True
    # Keep sharded parameters, gradients and optimizer state in CPU memory.
    cpu_offload: bool = False
    # Build on the meta device so no rank ever holds the whole model.
    meta_init: bool = False


class FSDPEngine(DCPEngine):
    name = "fsdp"
    options = FSDPOptions

    def __init__(self, cfg: Config, world: WorldInfo):
        if cfg.engine.fsdp.cpu_offload and resolve_device(cfg.run.device, world).type == "cpu":
            raise ConfigError(
                "engine.fsdp.cpu_offload: offloading keeps sharded state in CPU memory between accelerator steps; "
                "this run already computes on the CPU"
            )
        super().__init__(cfg, world)

    def init_context(self) -> contextlib.AbstractContextManager:
        return torch.device("meta") if self.cfg.engine.fsdp.meta_init else contextlib.nullcontext()

    def setup(self, method: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        opts, fsdp = self.cfg.engine, self.cfg.engine.fsdp
        mesh = init_device_mesh(self.device.type, (self.world.world_size,))
        policy = {
            "mesh": mesh,
            "reshard_after_forward": fsdp.reshard_after_forward,
            # bf16 compute with fp32 gradient reduction; gloo on CPU cannot all-gather bf16 reliably
            "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if self.precision == "bf16" and self.device.type == "cuda"
            else MixedPrecisionPolicy(),
        }
        if fsdp.cpu_offload:
            policy["offload_policy"] = CPUOffloadPolicy()
        prepare_blocks(method, opts.activation_checkpointing, opts.compile)
        if not fsdp.meta_init and not fsdp.cpu_offload:
            method.to(self.device)
        for blocks in method.transformer_blocks():
            for block in blocks:
                fully_shard(block, **policy)
        fully_shard(method, **policy)
        if fsdp.meta_init:
            # Allocate only this rank's shards, then initialize them; buffers are recomputed.
            method.to_empty(device="cpu" if fsdp.cpu_offload else self.device)
            method.init_weights()
        return method, make_optimizer(method)

    def accumulate(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        model.set_requires_gradient_sync(last_micro_step)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def full_parameters(self, model: nn.Module, module: nn.Module):
        # Gathering happens in forward hooks of the root and of each block; evaluation and pictures call
        # into the middle of those (cls token, a block's norm), so gather them explicitly.
        groups = [model, *(m for m in module.modules() if isinstance(m, FSDPModule) and m is not model)]
        for group in groups:
            group.unshard()
        try:
            yield
        finally:
            for group in groups:
                group.reshard()

    def local_tensors(self, param: nn.Parameter) -> list[torch.Tensor]:
        return [param.data.to_local() if isinstance(param.data, DTensor) else param.data]

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        norm = super().clip_grad_norm(model, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm
