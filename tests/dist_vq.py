"""Under torchrun with 2 ranks: a few training calls of a VectorQuantizer on each rank's slice of fixed
batches (unequal slices), with far-away codes that die and restart; rank 0 saves every rank's results.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_vq.py OUT
"""

from __future__ import annotations

import datetime
import sys

import torch
import torch.distributed as dist

from pretrain.models.vq import VectorQuantizer

CODES, DIM, STEPS, BATCH, SPLIT, SIDE = 8, 3, 3, 5, 2, 2  # rank 0 holds images [0, 2), rank 1 [2, 5)
SEED = 7  # the restart generator's seed, the same on every rank
GLOBAL_SEED = 100  # rank r seeds the global RNG with GLOBAL_SEED + r; one process with GLOBAL_SEED
CASES = {"ema": ("ema", SEED), "straight_through": ("straight_through", SEED), "ema_global_rng": ("ema", None)}


def fixed_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, DIM, SIDE, SIDE, generator=generator) for _ in range(STEPS)]


def make_quantizer(update: str) -> VectorQuantizer:
    """Half the codes among the data, half 100 away from it: those go unused, die after one update and
    restart at the second call."""
    quantizer = VectorQuantizer(CODES, DIM, update=update, dead_code_threshold=1.0)
    codes = torch.randn(CODES, DIM, generator=torch.Generator().manual_seed(1))
    codes[CODES // 2 :] += 100.0
    with torch.no_grad():
        quantizer.embedding.copy_(codes)
        if update == "ema":
            quantizer.ema_sum.copy_(codes)
    return quantizer.train()


def run(case: str, batches: list[torch.Tensor]) -> dict:
    """STEPS training calls on `batches`; the state and what each call returned."""
    update, seed = CASES[case]
    quantizer = make_quantizer(update)
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    calls = [quantizer(batch, generator) for batch in batches]
    return {
        "state": {name: value.detach().clone() for name, value in quantizer.state_dict().items()},
        "indices": [call.indices for call in calls],
        "restarted": [call.restarted for call in calls],
        "usage": [call.usage for call in calls],
        "perplexity": [call.perplexity for call in calls],
    }


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))  # a divergence fails fast
    rank = dist.get_rank()
    mine = [batch[:SPLIT] if rank == 0 else batch[SPLIT:] for batch in fixed_batches()]
    results = {}
    for case in CASES:
        torch.manual_seed(GLOBAL_SEED + rank)
        results[case] = run(case, mine)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        torch.save(gathered, sys.argv[1])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
