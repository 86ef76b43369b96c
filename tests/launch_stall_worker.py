"""Under torchrun: train, but rank STALL_RANK stops making progress in its STALL_STEP-th optimizer
step (it sleeps), the way a stuck data worker or a lost peer would; the other ranks then wait in
the next collective. The hang watchdog must end every rank.

    torchrun --nproc-per-node 2 tests/launch_stall_worker.py CONFIG STALL_RANK STALL_STEP --set ...
"""

from __future__ import annotations

import sys
import time

from pretrain.recipes import load_config
from pretrain.train import Trainer


def stall_in_optimizer_step(trainer: Trainer, at_step: int) -> None:
    step_optimizer = trainer.engine.optimizer_step
    calls = 0

    def stalled_optimizer_step(optimizer):
        nonlocal calls
        calls += 1
        if calls == at_step:
            time.sleep(600)
        return step_optimizer(optimizer)

    trainer.engine.optimizer_step = stalled_optimizer_step


def main() -> None:
    config, stall_rank, stall_step, *rest = sys.argv[1:]
    overrides = [value for flag, value in zip(rest[::2], rest[1::2]) if flag == "--set"]
    trainer = Trainer(load_config(config, overrides))
    if trainer.world.rank == int(stall_rank):
        stall_in_optimizer_step(trainer, int(stall_step))
    trainer.fit()


if __name__ == "__main__":
    main()
