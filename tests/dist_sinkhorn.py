"""Under torchrun with 2 ranks: Sinkhorn-Knopp on each rank's half of a fixed batch of logits (unequal
halves, as iBOT's masked tokens are), rank 0 saving every rank's targets.

python -m torch.distributed.run --nproc-per-node 2 tests/dist_sinkhorn.py OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

from pretrain.methods.dinov2_losses import sinkhorn_knopp

ROWS, PROTOTYPES, SPLIT = 11, 7, 4  # rank 0 holds rows [0, 4), rank 1 [4, 11)


def fixed_logits() -> torch.Tensor:
    return torch.randn(ROWS, PROTOTYPES, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    logits = fixed_logits()
    mine = logits[:SPLIT] if rank == 0 else logits[SPLIT:]
    targets = sinkhorn_knopp(mine, 0.1)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, targets)
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
