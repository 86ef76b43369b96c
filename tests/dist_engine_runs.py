"""Under torchrun: methods with state beyond one rank's batch (SimCLR and MoCo v2 with BatchNorm in a ResNet-18;
a ViT fine-tune with layer-wise learning rates and an EMA) take STEPS optimizer steps on a fixed global batch
through one engine after another, in the same processes; each rank feeds its slice of the images (both views).
Rank 0 saves each run's losses and whole state (parameters, BN running statistics, MoCo's queue, the EMA), for
the tests to compare with one process on the whole batch (`train_steps` in the test process).

python -m torch.distributed.run --nproc-per-node 2 tests/dist_engine_runs.py OUT RUN...
(each RUN is METHOD[,override...], e.g. moco_v2,engine.kind=fsdp)
"""

from __future__ import annotations

import sys

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


def moco_overrides(*extra: str) -> list[str]:
    """A ResNet-18 with the small stem on 16 px images, BatchNorm groups of 2 and a queue of 20 keys: the 8
    images of a step are 2 groups per rank at world size 2, and the queue wraps around at the third step.
    (At 8 px the last stage's BatchNorms would normalize 2 values a channel, which amplifies ZeRO-3's float32
    rounding past any useful tolerance.)"""
    return [
        "method.name=moco_v2",
        "model.arch=resnet18",
        "model.resnet_stem=small",
        "data.image_size=16",
        "data.batch_size=4",
        "method.moco_v2.mlp_hidden_dim=32",
        "method.moco_v2.proj_dim=16",
        "method.moco_v2.queue_size=20",
        "method.moco_v2.bn_group_size=2",
        "method.moco_v2.momentum=0.9",
        "run.device=cpu",
        "optim.lr_scaling=none",
        "optim.weight_decay=1e-4",
        *extra,
    ]


def finetune_overrides(*extra: str) -> list[str]:
    """A ViT-tiny/4 fine-tune on 8 px images: layer decay, fc_norm, label smoothing and an EMA. Drop path and mixup
    are off: they draw per micro-batch from the loop's seeding, which this harness does not run."""
    return [
        "method.name=finetune",
        "model.size=tiny",
        "model.patch_size=4",
        "data.image_size=8",
        "method.finetune.num_classes=5",
        "method.finetune.layer_decay=0.7",
        "method.finetune.drop_path=0.0",
        "method.finetune.mixup=0.0",
        "method.finetune.cutmix=0.0",
        "method.finetune.label_smoothing=0.1",
        "method.finetune.head_init_std=0.02",
        "method.finetune.ema_decay=0.5",
        "run.device=cpu",
        "optim.lr_scaling=none",
        *extra,
    ]


def dinov2_overrides(*extra: str) -> list[str]:
    """A ViT-tiny/4 with LayerScale and 2 registers on 16 px crops, narrow heads, iBOT masks and Sinkhorn-Knopp
    targets over both ranks. KoLeo is off (it is per rank's batch by design, as is the release's patch center
    under `centering`) and so is stochastic depth (it draws per micro-batch from the loop's seeding, which
    this harness does not run)."""
    return [
        "method.name=dinov2",
        "model.size=tiny",
        "model.patch_size=4",
        "model.layer_scale=0.1",
        "model.num_register_tokens=2",
        "model.pos_embed=learned_cls",
        "model.init=trunc_normal",
        "data.image_size=16",
        "method.dinov2.out_dim=64",
        "method.dinov2.hidden_dim=32",
        "method.dinov2.bottleneck_dim=16",
        "method.dinov2.koleo_weight=0",
        "method.dinov2.drop_path_rate=0",
        "method.dinov2.mask_probability=0.75",
        "method.dinov2.centering=sinkhorn_knopp",
        "run.device=cpu",
        "optim.lr_scaling=none",
        *extra,
    ]


def dinov2_distill_overrides(*extra: str) -> list[str]:
    """dinov2's, distilling a frozen ViT-small/4 teacher into the ViT-tiny/4 student: the patch loss on every
    patch, a spare EMA of the student. The teacher keeps its random initialization (the checkpoint named is
    never read: this harness builds methods, it does not run the loop that loads a teacher)."""
    return dinov2_overrides(
        'method.dinov2.teacher_checkpoint="teacher-of-the-harness"',
        "method.dinov2.teacher_model.size=small",
        "method.dinov2.teacher_model.patch_size=4",
        "method.dinov2.teacher_model.layer_scale=0.1",
        "method.dinov2.teacher_image_size=16",
        "method.dinov2.ibot_separate_head=true",
        "method.dinov2.ibot_out_dim=48",
        *extra,
    )


def pixelcnn_overrides(*extra: str) -> list[str]:
    """A class-conditional gated PixelCNN over 8 px RGB images (3 channel groups), 256-way softmax."""
    return [
        "method.name=pixelcnn",
        "data.image_size=8",
        "method.pixelcnn.channels=3",
        "method.pixelcnn.hidden_channels=12",
        "method.pixelcnn.layers=3",
        "method.pixelcnn.first_kernel_size=5",
        "method.pixelcnn.num_classes=5",
        "run.device=cpu",
        "optim.lr_scaling=none",
        *extra,
    ]


def vq_overrides(*extra: str) -> list[str]:
    """A VQ tokenizer at downsample 4 on 16 px images with 16 codes: EMA codebook reduced over ranks, and a
    high dead-code threshold so restarts happen, drawn alike on every rank."""
    return [
        "method.name=vq",
        "data.image_size=16",
        "method.vq.downsample=4",
        "method.vq.base_channels=8",
        "method.vq.norm_groups=4",
        "method.vq.layers_per_block=1",
        "method.vq.latent_channels=8",
        "method.vq.num_codes=16",
        "method.vq.code_dim=4",
        "method.vq.dead_code_threshold=2.0",
        "run.device=cpu",
        "optim.lr_scaling=none",
        *extra,
    ]


def gpt_overrides(*extra: str) -> list[str]:
    """A 2-block token transformer of width 32 over 4 x 4 grids of 32 codes, 5 classes. Label dropout is off: it
    draws from the loop's seeding, which this harness does not run."""
    return [
        "method.name=gpt",
        "data.image_size=16",
        "method.gpt.size=small",
        "method.gpt.hidden_dim=32",
        "method.gpt.depth=2",
        "method.gpt.num_heads=2",
        "method.gpt.vocab_size=32",
        "method.gpt.token_grid=4",
        "method.gpt.num_classes=5",
        "method.gpt.class_dropout=0",
        "run.device=cpu",
        "optim.lr_scaling=none",
        *extra,
    ]


OVERRIDES = {
    "simclr": simclr_overrides,
    "moco_v2": moco_overrides,
    "finetune": finetune_overrides,
    "dinov2": dinov2_overrides,
    "dinov2_distill": dinov2_distill_overrides,
    "pixelcnn": pixelcnn_overrides,
    "vq": vq_overrides,
    "gpt": gpt_overrides,
}


def run_config(run: str, engines: bool = True):
    """The config of RUN (METHOD[,override...]); without `engines`, its engine.* overrides are dropped
    (the one-process reference)."""
    from pretrain.recipes import load_config

    method, *sets = run.split(",")
    return load_config(None, OVERRIDES[method](*[s for s in sets if engines or not s.startswith("engine.")]))


def global_views(step: int, size: int = 16) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return [torch.randn(IMAGES, 3, size, size, generator=generator) for _ in range(2)]


def batch_of(cfg, step: int, mine: slice, dtype: torch.dtype) -> dict:
    """This rank's slice of step's global batch: two views for the contrastive methods, one labelled image else
    (integer pixels for the PixelCNN, token grids for the token transformer)."""
    views = global_views(step, cfg.data.image_size)
    if cfg.method.name == "pixelcnn":  # integer pixels and labels
        generator = torch.Generator().manual_seed(step)
        pixels = torch.randint(0, 256, (IMAGES, 3, cfg.data.image_size, cfg.data.image_size), generator=generator)
        return {"image": pixels[mine], "label": (torch.arange(IMAGES) % 5)[mine]}
    if cfg.method.name == "gpt":  # token grids and labels
        generator = torch.Generator().manual_seed(step)
        tokens = torch.randint(0, cfg.method.gpt.vocab_size, (IMAGES, 4, 4), generator=generator)
        return {"image": tokens[mine], "label": (torch.arange(IMAGES) % 5)[mine]}
    if cfg.method.name == "vq":  # one image
        return {"image": views[0][mine].to(dtype)}
    if cfg.method.name != "finetune":
        return {"image": [view[mine].to(dtype) for view in views]}
    labels = torch.arange(IMAGES) % cfg.method.finetune.num_classes
    return {"image": views[0][mine].to(dtype), "label": labels[mine]}


def train_steps(cfg, world) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS optimizer steps of cfg's method through cfg's engine on this rank's slice of the global batch:
    the losses (averaged over ranks) and the whole state (parameters and buffers) in float32 on the CPU.
    Run it in float64 (torch.set_default_dtype): the comparison is then exact up to summation order (in
    float32 the BatchNorms of a freshly initialized ResNet on noise amplify the rounding differences of
    batch 8 vs 4 convolutions to ~1e-2). ZeRO holds float32, bfloat16 or float16 parameters only (DeepSpeed
    0.19.8 asserts it): its runs start from the same float64 initialization, rounded to float32."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from pretrain.engines import ENGINES
    from pretrain.methods.registry import build_method
    from pretrain.optim import build_optimizer

    engine = ENGINES[cfg.engine.kind](cfg, world)
    torch.manual_seed(0)
    with engine.init_context():
        method = build_method(cfg)
    if cfg.engine.kind == "deepspeed":
        method.float()
    dtype = next(method.parameters()).dtype
    model, optimizer = engine.setup(
        method, lambda m: build_optimizer(m, cfg.optim, cfg.optim.base_lr, m.no_weight_decay(), m.lr_scale)
    )
    per_rank = IMAGES // world.world_size
    mine = slice(world.rank * per_rank, (world.rank + 1) * per_rank)
    losses = []
    for step in range(STEPS):
        batch = batch_of(cfg, step, mine, dtype)
        with engine.accumulate(model, True), engine.autocast():
            loss = model(batch)["loss"]
            engine.backward(loss)
        engine.optimizer_step(optimizer)
        if method.ema_pairs():
            engine.ema_update(method.ema_pairs(), method.ema_momentum(step + 1, STEPS))
        total = loss.detach().reshape(1).clone()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(float(total) / world.world_size)
    if cfg.engine.kind == "deepspeed":
        from pretrain.engines.deepspeed_checkpoint import consolidated_state

        state = consolidated_state(engine.ds)  # trained parameters (float32 masters: compared loosely), buffers
        state = {**state["model"], **state["buffers"]}
    else:
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state, _ = get_state_dict(model, optimizer, options=options)
    return losses, {k: v.detach().float().cpu() for k, v in state.items()}


def main() -> None:
    from pretrain.distributed import destroy_distributed
    from pretrain.runtime.world import world_from_env

    out, runs = sys.argv[1], sys.argv[2:]
    torch.set_default_dtype(torch.float64)
    world = world_from_env()
    results = {}
    for run in runs:
        losses, state = train_steps(run_config(run), world)
        results[run] = {"losses": losses, "state": state}
    if world.rank == 0:
        torch.save(results, out)
    destroy_distributed()


if __name__ == "__main__":
    main()
