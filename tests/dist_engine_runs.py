"""Under torchrun: SimCLR on a ResNet-18 (BatchNorm everywhere) takes STEPS optimizer steps on a fixed
global batch through one engine; each rank feeds its slice of the images (both views). Rank 0 saves the
losses and the whole state (parameters and BN running statistics), for the tests to compare with one
process on the whole batch.

python -m torch.distributed.run --nproc-per-node N tests/dist_simclr_engines.py OUT --set k=v ...
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist

IMAGES = 8  # global batch
STEPS = 3


def simclr_overrides(*extra: str) -> list[str]:
    """A ResNet-18 with the small stem on 16 px images and a narrow head: seconds per step on 2 cores."""
    return [
        "method.name=simclr",
        "model.arch=resnet18",
        "model.resnet_stem=small",
        "data.image_size=16",
        "method.simclr.proj_hidden_dim=32",
        "method.simclr.proj_dim=16",
        "method.simclr.temperature=0.2",
        "run.device=cpu",
        "optim.lr_scaling=none",
        "optim.weight_decay=1e-4",
        *extra,
    ]


def global_views(step: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(IMAGES, 3, 16, 16, generator=generator) for _ in range(2)]


def main() -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from pretrain.distributed import destroy_distributed
    from pretrain.engines import ENGINES
    from pretrain.methods.registry import build_method
    from pretrain.optim import build_optimizer
    from pretrain.recipes import load_config
    from pretrain.runtime.world import world_from_env

    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(None, simclr_overrides(*args.overrides))
    world = world_from_env()
    engine = ENGINES[cfg.engine.kind](cfg, world)
    # float64: the comparison is then exact up to summation order (in float32 the BatchNorms of a freshly
    # initialized ResNet on noise amplify the rounding differences of batch 8 vs 4 convolutions to ~1e-2).
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    with engine.init_context():
        method = build_method(cfg)
    model, optimizer = engine.setup(
        method, lambda m: build_optimizer(m, cfg.optim, cfg.optim.base_lr, m.no_weight_decay())
    )
    per_rank = IMAGES // world.world_size
    mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    losses = []
    for step in range(STEPS):
        batch = {"image": [view[mine].double() for view in global_views(step)]}
        with engine.accumulate(model, True), engine.autocast():
            loss = model(batch)["loss"]
            engine.backward(loss)
        engine.optimizer_step(optimizer)
        total = loss.detach().reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(float(total) / world.world_size)
    if cfg.engine.kind == "deepspeed":
        from pretrain.engines.deepspeed_checkpoint import consolidated_state

        state = consolidated_state(engine.ds)
        state = {**state["model"], **state["buffers"]}  # float32 master weights: compared loosely
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state, _ = get_state_dict(model, optimizer, options=options)
    if world.rank == 0:
        torch.save({"losses": losses, "state": {k: v.detach().float().cpu() for k, v in state.items()}}, args.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
