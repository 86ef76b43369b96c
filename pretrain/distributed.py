"""Process-group setup and the few collectives the train loop needs (all no-ops on one process)."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from pretrain.runtime.world import WorldInfo


def init_distributed(world: WorldInfo, device: torch.device, timeout_minutes: float = 30.0) -> None:
    """NCCL between GPUs, gloo on CPU; rendezvous from the launcher's MASTER_ADDR/MASTER_PORT."""
    if not world.distributed or dist.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend="nccl" if device.type == "cuda" else "gloo",
        rank=world.rank,
        world_size=world.world_size,
        timeout=datetime.timedelta(minutes=timeout_minutes),
        device_id=device if device.type == "cuda" else None,
    )


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over ranks, in place; gloo has no AVG, so sum and divide."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place, without gradient (statistics every rank must agree on)."""
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_floats(values: list[float]) -> list[list[float]]:
    """Every rank's `values` (same length on all ranks), indexed by rank."""
    if not dist.is_initialized():
        return [list(values)]
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    local = torch.tensor(values, dtype=torch.float64, device=device)
    out = [torch.zeros_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(out, local)
    return [t.tolist() for t in out]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, without gradient (MoCo's keys)."""
    if not dist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def all_gather_cat_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` concatenated along dim 0 in rank order, backpropagating to every rank's input:
    the gradient of a rank's slice is the sum of all ranks' gradients for it (SimCLR's negatives)."""
    if not dist.is_initialized():
        return tensor
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(tensor.contiguous()))


def all_reduce_sum_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks that backpropagates to every rank's input (cross-rank batch statistics)."""
    if not dist.is_initialized():
        return tensor
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(tensor, op=dist.ReduceOp.SUM)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
