"""Under torchrun: each rank normalizes its slice of a fixed global batch with a GlobalBatchNorm (forward,
backward, running statistics); rank 0 saves every rank's output, input gradient and parameter gradients.

python -m torch.distributed.run --nproc-per-node 2 tests/dist_global_bn.py OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.engines.batch_norm import GlobalBatchNorm


def global_bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch [8, 3, 4, 4] (not zero-mean, so the mean matters) and the weights of its loss."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 4, 4, generator=generator) * 2 + 1
    return x, torch.randn(8, 3, 4, 4, generator=generator)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    x, weights = global_bn_batch()
    per_rank = x.shape[0] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    bn = GlobalBatchNorm(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
    local = x[mine].clone().requires_grad_(True)
    out = bn(local)
    (out * weights[mine]).sum().backward()
    result = {"out": out.detach(), "grad": local.grad, "dweight": bn.weight.grad, "dbias": bn.bias.grad,
              "running_mean": bn.running_mean, "running_var": bn.running_var}  # fmt: skip
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
