"""Under torchrun with 2 ranks: each rank takes its half of a fixed global batch, computes MoCo's loss
with keys gathered from both ranks, and rank 0 saves every rank's loss and query gradient.

python -m torch.distributed.run --nproc-per-node 2 tests/dist_moco_gather.py OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.methods.moco import moco_contrastive_loss


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    q, k = torch.randn(8, 16), torch.randn(8, 16)
    per_rank = 8 // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    query = q[mine].clone().requires_grad_(True)
    loss = moco_contrastive_loss(query, k[mine], 0.2)
    loss.backward()
    result = {"loss": loss.detach(), "grad": query.grad}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
