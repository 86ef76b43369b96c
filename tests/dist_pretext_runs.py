"""Under torchrun: the 2-rank runs of tests/test_pretext.py::test_two_ranks_match_one_process, one after another
in the same processes (process start-up and imports are the larger part of each run's cost). Each CASE
(NAME,ENGINE) is the full training loop, `pretrain.train.train(cfg)`, on the config the test builds
(`two_ranks_overrides`), in OUT/NAME-ENGINE/tiny (its metrics.jsonl is what the test reads).

A case that raises leaves its traceback in OUT/NAME-ENGINE/error-rank{R}.txt and the next case runs. Before
the next one every rank meets the others at a barrier on a group of its own, with a timeout: a rank that
raised while another still waits in one of the run's collectives then fails the whole torchrun there,
loudly, rather than hanging or pairing its next collectives with the wrong ones.

python -m torch.distributed.run --standalone --nproc-per-node 2 tests/dist_pretext_runs.py OUT SHARDS CASE...
"""

from __future__ import annotations

import datetime
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

BARRIER_TIMEOUT = datetime.timedelta(minutes=3)


def case_dir(out: Path, name: str, engine: str) -> Path:
    return out / f"{name}-{engine}"


def main() -> None:
    from test_pretext import config, two_ranks_overrides

    from pretrain.distributed import destroy_distributed, init_distributed
    from pretrain.recipes import load_config
    from pretrain.runtime.world import world_from_env
    from pretrain.train import train

    out, shards, cases = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    world = world_from_env()
    init_distributed(world, torch.device("cpu"))  # what the engines would do; they find it initialized
    between_runs = dist.new_group(backend="gloo", timeout=BARRIER_TIMEOUT)
    for case in cases:
        name, engine = case.split(",")
        run = case_dir(out, name, engine)
        try:
            train(load_config(config(name), two_ranks_overrides(name, engine, run, shards)))
        except Exception:
            run.mkdir(parents=True, exist_ok=True)
            (run / f"error-rank{world.rank}.txt").write_text(traceback.format_exc())
            print(f"[rank{world.rank}] {case} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        dist.monitored_barrier(group=between_runs, timeout=BARRIER_TIMEOUT, wait_all_ranks=True)
    destroy_distributed()


if __name__ == "__main__":
    main()
