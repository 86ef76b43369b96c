"""`pretrain sample`: class-conditional samples from a DiT checkpoint's EMA weights (or a PixelCNN's, pixel by
pixel), as a PNG grid."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from PIL import Image

from pretrain.checkpoint import find_checkpoint, read_meta
from pretrain.diffusion.sampling import SAMPLERS
from pretrain.engines.base import resolve_device
from pretrain.runtime.world import WorldInfo
from pretrain.visualize import image_grid


def sample_grid(
    checkpoint: str | Path,
    label: int,
    num: int = 64,
    steps: int = 50,
    cfg_scale: float = 5.0,
    sampler: str = "euler",
    seed: int = 0,
    use_ema: bool = True,
    guided_channels: int = 0,
) -> torch.Tensor:
    """uint8 [H, W, 3] grid of `num` samples of class `label` (rows of ceil(sqrt(num))); `cfg_scale` is the
    paper's guidance scale s (1: no guidance), `guided_channels` > 0 guides only the first channels."""
    from pretrain.ckpt.load import load_method
    from pretrain.methods.dit import RectifiedFlowDiT
    from pretrain.methods.pixelcnn import PixelCNNMethod

    cfg, method, path = load_method(checkpoint)
    if isinstance(method, PixelCNNMethod):
        return _pixelcnn_grid(cfg, method, label, num, seed)
    if not isinstance(method, RectifiedFlowDiT):
        raise ValueError(
            f"{path} was trained with method.name={cfg.method.name!r}; sampling needs a 'dit' or 'pixelcnn' checkpoint"
        )
    if not 0 <= label < method.ema.num_classes:
        raise ValueError(f"--class {label} is outside [0, {method.ema.num_classes})")
    device = resolve_device(cfg.run.device, WorldInfo())
    method.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.full((num,), label, dtype=torch.long, device=device)
    latents = method.generate(
        labels, steps, cfg_scale, sampler, generator, use_ema=use_ema, guided_channels=guided_channels
    )
    return image_grid(method.decode(latents), nrow=math.ceil(math.sqrt(num)))


def _pixelcnn_grid(cfg, method, label: int, num: int, seed: int) -> torch.Tensor:
    """A PixelCNN's samples, pixel by pixel (`PixelCNN.sample`); `label` is ignored by an unconditional model."""
    classes = method.model.num_classes
    if classes and not 0 <= label < classes:
        raise ValueError(f"--class {label} is outside [0, {classes})")
    device = resolve_device(cfg.run.device, WorldInfo())
    method.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.full((num,), label, dtype=torch.long, device=device) if classes else None
    samples = method.generate(labels, num, generator)
    return image_grid(samples.float().div(255), nrow=math.ceil(math.sqrt(num)))


def cmd_sample(args: argparse.Namespace) -> int:
    grid = sample_grid(
        args.checkpoint,
        args.label,
        args.num,
        args.steps,
        args.cfg_scale,
        args.sampler,
        args.seed,
        not args.online,
        args.guided_channels,
    )
    Image.fromarray(grid.numpy()).save(args.out)
    if read_meta(find_checkpoint(args.checkpoint))["config"]["method"]["name"] == "pixelcnn":
        how = "pixel by pixel"
    else:
        how = f"{args.sampler}, {args.steps} steps, guidance scale s={args.cfg_scale}"
    print(f"{args.num} samples of class {args.label} ({how}): {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample", help="class-conditional samples from a DiT or PixelCNN checkpoint, as a PNG grid"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--class", dest="label", type=int, required=True, help="class index to generate")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--steps", type=int, default=50, help="ODE steps (default 50; Heun uses 2 model calls per step)")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=5.0,
        help="guidance scale s of the DiT paper: v = v_uncond + s (v_cond - v_uncond); 1 = no guidance (default 5.0)",
    )
    p.add_argument(
        "--guided-channels",
        type=int,
        default=0,
        help="guide only the first N channels (3 reproduces the released DiT sampler); 0 = all (default)",
    )
    p.add_argument("--sampler", choices=SAMPLERS, default="euler")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--online", action="store_true", help="sample from the online weights instead of the EMA")
    p.add_argument("--out", default="grid.png", help="PNG file to write (default grid.png)")
    p.set_defaults(func=cmd_sample)
