"""Under torchrun: each rank takes its images of a fixed global batch (both views), computes SimCLR's
NT-Xent with the embeddings of every rank gathered with gradients, and rank 0 saves every rank's loss
and embedding gradient.

python -m torch.distributed.run --nproc-per-node 2 tests/dist_simclr_gather.py OUT IMPL
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from pretrain.methods.simclr import nt_xent_loss


def global_embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    """Two views of 8 images, 16-d each."""
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 16, generator=generator), torch.randn(8, 16, generator=generator)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    first, second = global_embeddings()
    per_rank = first.shape[0] // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    local = torch.cat([first[mine], second[mine]]).requires_grad_(True)
    loss = nt_xent_loss(local, 0.3, impl=sys.argv[2])
    loss.backward()
    gathered = [None] * world
    dist.all_gather_object(gathered, {"loss": loss.detach(), "grad": local.grad})
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    dist.barrier()  # no rank tears gloo down while its peer still has a collective in flight
    dist.destroy_process_group()
    # Skip the interpreter's teardown: under load a rank has aborted there ("terminate called without an active
    # exception", twice in CI runs), after its result was written and the group destroyed.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
