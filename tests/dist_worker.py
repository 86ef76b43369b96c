"""Run under torchrun by the engine tests: build a Trainer (which resumes), dump its full state, train on.

python -m torch.distributed.run --nproc-per-node N tests/dist_worker.py CONFIG OUT [--fit] [--set k=v ...]
"""

from __future__ import annotations

import argparse

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from pretrain.distributed import destroy_distributed
from pretrain.recipes import load_config
from pretrain.train import Trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out", help="rank 0 writes the full (unsharded) model and optimizer state here")
    parser.add_argument("--fit", action="store_true", help="train to train.steps after dumping")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    trainer = Trainer(load_config(args.config, args.overrides))
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer, options=options)
    if trainer.world.is_main:
        torch.save({"step": trainer.step, "model": model_state, "optim": optim_state}, args.out)
    if args.fit:
        trainer.fit()
    destroy_distributed()


if __name__ == "__main__":
    main()
