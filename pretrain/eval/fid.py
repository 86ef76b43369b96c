"""`pretrain eval fid`: FID of a DiT checkpoint's class-balanced EMA samples against real images from shards,
with Inception weights from a local file (nothing is downloaded)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loader import ResumableLoader
from pretrain.diffusion.transforms import pixel_transform, to_unit
from pretrain.engines.base import resolve_device
from pretrain.eval.frechet import frechet_distance
from pretrain.eval.inception import inception_features, load_fid_inception
from pretrain.runtime.world import WorldInfo


def real_images(shards: str, split: str, image_size: int, limit: int) -> torch.Tensor:
    """Up to `limit` images of a split in [0, 1], RGB, in shard order."""
    loader = ResumableLoader(
        shards,
        batch_size=100,
        transform=pixel_transform(image_size, 3, train=False),
        shuffle_buffer=0,
        infinite=False,
        split=split,
    )
    images, count = [], 0
    for batch in loader:
        images.append(to_unit(batch["image"]))
        count += len(images[-1])
        if count >= limit:
            break
    return torch.cat(images)[:limit]


@torch.no_grad()
def generated_images(method, per_class: int, steps: int, cfg_scale: float, sampler: str, seed: int, batch: int = 100):
    """per_class EMA samples of every class, decoded to pictures in [0, 1]."""
    device = method.ema.x_embedder.weight.device
    labels = torch.arange(method.ema.num_classes, device=device).repeat_interleave(per_class)
    generator = torch.Generator(device=device).manual_seed(seed)
    pictures = []
    for start in range(0, len(labels), batch):
        latents = method.generate(labels[start : start + batch], steps, cfg_scale, sampler, generator)
        pictures.append(method.decode(latents).cpu())
    return torch.cat(pictures)


def evaluate_fid(
    checkpoint: str | Path,
    inception_weights: str | Path,
    shards: str,
    split: str = "train",
    per_class: int = 50,
    max_real: int = 50000,
    steps: int = 50,
    cfg_scale: float = 1.5,
    sampler: str = "euler",
    seed: int = 0,
) -> dict[str, Any]:
    from pretrain.ckpt.load import load_method
    from pretrain.methods.dit import RectifiedFlowDiT

    start = time.perf_counter()
    cfg, method, path = load_method(checkpoint)
    if not isinstance(method, RectifiedFlowDiT):
        raise ValueError(
            f"{path} was trained with method.name={cfg.method.name!r}; FID needs a 'dit' or 'dit_distill' checkpoint"
        )
    device = resolve_device(cfg.run.device, WorldInfo())
    inception = load_fid_inception(inception_weights).to(device)
    fake = generated_images(method.to(device), per_class, steps, cfg_scale, sampler, seed)
    real = real_images(shards, split, fake.shape[-1], max_real)
    fid = frechet_distance(inception_features(inception, real), inception_features(inception, fake))
    return {
        "checkpoint": str(path),
        "fid": fid,
        "num_real": len(real),
        "num_generated": len(fake),
        "steps": steps,
        "cfg_scale": cfg_scale,
        "sampler": sampler,
        "seconds": time.perf_counter() - start,
    }


def cmd_fid(args: argparse.Namespace) -> int:
    report = evaluate_fid(
        args.checkpoint,
        args.inception_weights,
        args.shards,
        args.split,
        args.per_class,
        args.max_real,
        args.steps,
        args.cfg_scale,
        args.sampler,
        args.seed,
    )
    print(
        json.dumps(report)
        if args.json
        else f"FID {report['fid']:.2f} ({report['num_generated']} samples, "
        f"{report['num_real']} real, s={args.cfg_scale}, {args.sampler} {args.steps} steps)"
    )
    return 0


def register(eval_commands: argparse._SubParsersAction) -> None:
    p = eval_commands.add_parser("fid", help="FID of a DiT checkpoint's samples (needs local Inception weights)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--inception-weights", required=True, help="FID Inception weights, e.g. pt_inception-2015-12-05.pth")
    p.add_argument("--shards", required=True, help="real images: an image shard directory or manifest")
    p.add_argument("--split", default="train")
    p.add_argument("--per-class", type=int, default=50, help="generated samples per class (default 50)")
    p.add_argument("--max-real", type=int, default=50000, help="real images used at most (default 50000)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=1.5,
        help="guidance scale s of the DiT paper (1 = none); 1.5 is its FID-50K setting (default)",
    )
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_fid)
