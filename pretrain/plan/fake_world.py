"""The job's model as one rank of the target world sees it, built inside this one process.

A fake process group (torch's "fake" backend: every collective returns at once, no data moves) stands in
for the W ranks, and the method is built on the meta device, so a 64-node plan allocates nothing of the
model's size. The FSDP engine's own wrapping is applied as training applies it (activation checkpointing,
then `fully_shard` per transformer block and at the root), and the shard each parameter gets on this rank
is read back from FSDP2 itself, not recomputed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import Config


@dataclass(frozen=True)
class ParamRecord:
    """One parameter: its global shape, whether it is trained, and which FSDP unit would gather it."""

    name: str
    shape: tuple[int, ...]
    requires_grad: bool
    group: str  # "root" or the block's name, e.g. "backbone.blocks.3"
    local_numel: int = 0  # this rank's shard (FSDP2's own view, without padding)
    padded_local_numel: int = 0  # what FSDP2 allocates per rank: dim 0 padded to a multiple of the world size
    decay: bool = True  # in the optimizer's weight-decay group (pretrain/optim.py's rule); matters for ZeRO-1/2 padding

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


@contextlib.contextmanager
def fake_process_group(world_size: int, rank: int = 0) -> Iterator[None]:
    """torch.distributed at `world_size` ranks inside this process; torn down on exit.

    Refuses to run inside a real process group rather than replacing it."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("a process group already exists; the planner builds its own fake one")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def build_meta_method(cfg: Config) -> nn.Module:
    """The method on the meta device: shapes and dtypes only."""
    from pretrain.methods.registry import build_method

    with torch.device("meta"):
        return build_method(cfg)


def block_names(method: nn.Module) -> dict[int, str]:
    """id(block) -> qualified name, for every block the engine wraps on its own."""
    names = {id(module): name for name, module in method.named_modules()}
    return {id(block): names[id(block)] for blocks in method.transformer_blocks() for block in blocks}


def plain_name(name: str) -> str:
    """Parameter names without the wrappers engines add (checkpoint_wrapper, compile), as DCP writes them."""
    return ".".join(p for p in name.split(".") if p not in ("_checkpoint_wrapped_module", "_orig_mod"))


def unit_of(name: str, blocks: list[str]) -> str:
    return next((b for b in blocks if name.startswith(b + ".")), "root")


def decays(method: nn.Module) -> dict[str, bool]:
    """Parameter name -> whether pretrain/optim.py puts it in the weight-decay group."""
    skip = method.no_weight_decay()
    return {plain_name(n): not (p.ndim <= 1 or plain_name(n) in skip) for n, p in method.named_parameters()}


def replicated_records(cfg: Config) -> list[ParamRecord]:
    """Every parameter whole (single, DDP, DeepSpeed before partitioning), with its would-be FSDP unit."""
    method = build_meta_method(cfg)
    blocks = sorted(block_names(method).values(), key=len, reverse=True)
    decay = decays(method)
    return [
        ParamRecord(n, tuple(p.shape), p.requires_grad, unit_of(n, blocks), p.numel(), p.numel(), decay[n])
        for n, p in method.named_parameters()
    ]


def fsdp_wrap(cfg: Config, world_size: int) -> nn.Module:
    """The method on the meta device wrapped as the FSDP engine wraps it; call inside fake_process_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from pretrain.engines.parallelize import apply_activation_checkpointing

    method = build_meta_method(cfg)
    if cfg.engine.activation_checkpointing:
        apply_activation_checkpointing(method)
    mesh = init_device_mesh("cpu", (world_size,))
    for block_list in method.transformer_blocks():
        for block in block_list:
            fully_shard(block, mesh=mesh, reshard_after_forward=cfg.engine.fsdp.reshard_after_forward)
    fully_shard(method, mesh=mesh)
    return method


def fsdp_records(cfg: Config, world_size: int, rank: int = 0) -> list[ParamRecord]:
    """Apply the FSDP engine's wrapping at `world_size` under a fake process group and read every
    parameter's local shard on `rank` from FSDP2's parameter state."""
    from torch.distributed.fsdp import FSDPModule

    with fake_process_group(world_size, rank):
        method = fsdp_wrap(cfg, world_size)
        decay = decays(method)
        records = []
        for unit_name, module in method.named_modules():
            if not isinstance(module, FSDPModule):
                continue
            group = module._get_fsdp_state()._fsdp_param_group
            if group is None:  # a unit whose parameters all belong to inner units
                continue
            unit = plain_name(unit_name) or "root"
            owned = {id(p): n for n, p in module.named_parameters()}
            for fsdp_param in group.fsdp_params:
                param = fsdp_param.sharded_param
                name = plain_name(f"{unit_name}.{owned[id(param)]}" if unit_name else owned[id(param)])
                padded = 1
                for s in fsdp_param.padded_sharded_param_size:
                    padded *= s
                records.append(
                    ParamRecord(
                        name=name,
                        shape=tuple(fsdp_param._orig_size),
                        requires_grad=param.requires_grad,
                        group=unit,
                        local_numel=param.to_local().numel(),
                        padded_local_numel=padded,
                        decay=decay[name],
                    )
                )
    return records
