"""`pretrain sample`: class-conditional samples of a generative checkpoint as a PNG grid: a DiT's (its EMA
weights, by an ODE sampler; a distilled student's in its few steps), a PixelCNN's (pixel by pixel), a token
transformer's (token by token, decoded by its VQ tokenizer) or a GAN's (its EMA generator, in one pass)."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from pretrain.diffusion.sampling import SAMPLERS
from pretrain.diffusion.transforms import to_unit
from pretrain.engines.base import resolve_device
from pretrain.runtime.world import WorldInfo
from pretrain.visualize import image_grid


@dataclass
class SampleOptions:
    """What `pretrain sample` may set; None takes the checkpoint's configured value. Each method reads its own:
    DiT the sampler's steps (a distilled student's: its few), sampler, guidance and EMA choice; the token
    transformer temperature, top-k, top-p, guidance and the KV cache; a GAN the truncation psi (StyleGAN);
    PixelCNN none."""

    steps: int | None = None
    cfg_scale: float | None = None
    sampler: str = "euler"
    use_ema: bool = True
    guided_channels: int = 0
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    use_cache: bool = True
    truncation_psi: float | None = None


def sample_grid(
    checkpoint: str | Path, label: int, num: int = 64, seed: int = 0, options: SampleOptions | None = None, **kwargs
) -> tuple[torch.Tensor, str]:
    """(uint8 [H, W, 3] grid of `num` samples of class `label` in rows of ceil(sqrt(num)), how they were drawn).
    `options` (or its fields as keyword arguments) as in `SampleOptions`; guidance scales are the papers' s
    (1: no guidance)."""
    from pretrain.ckpt.load import load_method
    from pretrain.methods.dit import RectifiedFlowDiT
    from pretrain.methods.gan import GANTraining
    from pretrain.methods.gpt import TokenAutoregressive
    from pretrain.methods.pixelcnn import PixelCNNMethod

    options = options or SampleOptions(**kwargs)
    cfg, method, path = load_method(checkpoint)
    kinds = (RectifiedFlowDiT, PixelCNNMethod, TokenAutoregressive, GANTraining)
    if not isinstance(method, kinds):
        raise ValueError(
            f"{path} was trained with method.name={cfg.method.name!r}; sampling needs a 'dit', 'dit_distill', "
            "'pixelcnn', 'gpt' or 'gan' checkpoint"
        )
    network = method.inference_network()
    if network.num_classes and not 0 <= label < network.num_classes:
        raise ValueError(f"--class {label} is outside [0, {network.num_classes})")
    device = resolve_device(cfg.run.device, WorldInfo())
    method.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.full((num,), label, dtype=torch.long, device=device)
    nrow = math.ceil(math.sqrt(num))
    if isinstance(method, PixelCNNMethod):
        samples = method.generate(labels if network.num_classes else None, num, generator)
        return image_grid(samples.float().div(255), nrow=nrow), "pixel by pixel"
    if isinstance(method, GANTraining):
        images = method.generate(labels if network.num_classes else None, num, generator, options.truncation_psi)
        psi = method.cfg.truncation_psi if options.truncation_psi is None else options.truncation_psi
        how = "one generator pass" + (f", truncation psi {psi:g}" if method.cfg.arch == "stylegan" else "")
        return image_grid(to_unit(images), nrow=nrow), how
    scale = method.sample_cfg_scale if isinstance(method, RectifiedFlowDiT) else method.cfg_scale
    scale = scale if options.cfg_scale is None else options.cfg_scale
    if isinstance(method, TokenAutoregressive):
        tokens = method.generate(
            labels, generator, options.temperature, options.top_k, options.top_p, scale, options.use_cache
        )
        how = (
            f"token by token, temperature {options.temperature or method.temperature:g}, "
            f"top-k {method.top_k if options.top_k is None else options.top_k}, "
            f"top-p {options.top_p or method.top_p:g}, guidance scale s={scale:g}"
        )
        return image_grid(method.decode(tokens), nrow=nrow), how
    steps = options.steps or method.sample_steps
    latents = method.generate(
        labels,
        steps,
        scale,
        options.sampler,
        generator,
        use_ema=options.use_ema,
        guided_channels=options.guided_channels,
    )
    how = f"{method.sampler_name(options.sampler)}, {steps} steps, guidance scale s={scale:g}"
    return image_grid(method.decode(latents), nrow=nrow), how


def cmd_sample(args: argparse.Namespace) -> int:
    options = SampleOptions(
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        sampler=args.sampler,
        use_ema=not args.online,
        guided_channels=args.guided_channels,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        use_cache=not args.no_kv_cache,
        truncation_psi=args.truncation_psi,
    )
    try:
        grid, how = sample_grid(args.checkpoint, args.label, args.num, args.seed, options)
    except ValueError as exc:  # not a generative checkpoint, a class it does not have, no tokenizer
        print(f"sample: {exc}", file=sys.stderr)
        return 2
    Image.fromarray(grid.numpy()).save(args.out)
    print(f"{args.num} samples of class {args.label} ({how}): {args.out}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sample",
        help="class-conditional samples from a DiT, PixelCNN, token-transformer or GAN checkpoint, as a PNG grid",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--class", dest="label", type=int, required=True, help="class index to generate")
    p.add_argument("--num", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="grid.png", help="PNG file to write (default grid.png)")
    p.add_argument(
        "--cfg-scale",
        type=float,
        default=None,
        help="guidance scale s of the DiT paper (DiT: v = v_uncond + s (v_cond - v_uncond); token transformer: the "
        "same on logits); 1 = no guidance (default: the checkpoint's method.*.sample_cfg_scale)",
    )
    dit = p.add_argument_group("DiT")
    dit.add_argument(
        "--steps",
        type=int,
        default=None,
        help="sampler steps (default: the checkpoint's method.dit.sample_steps; a progressive student's "
        "method.dit_distill.student_steps); Heun uses 2 model calls per step, a consistency student 1",
    )
    dit.add_argument(
        "--guided-channels",
        type=int,
        default=0,
        help="guide only the first N channels (3 reproduces the released DiT sampler); 0 = all (default)",
    )
    dit.add_argument("--sampler", choices=SAMPLERS, default="euler")
    dit.add_argument("--online", action="store_true", help="sample from the online weights instead of the EMA")
    gpt = p.add_argument_group("token transformer (default: the checkpoint's method.gpt.sample_*)")
    gpt.add_argument("--temperature", type=float, default=None, help="divides the logits")
    gpt.add_argument("--top-k", type=int, default=None, help="keep the k most probable tokens; 0 = all")
    gpt.add_argument("--top-p", type=float, default=None, help="keep the smallest set of mass p; 1 = all")
    gpt.add_argument(
        "--no-kv-cache", action="store_true", help="recompute the whole prefix per token (same tokens, slower)"
    )
    gan = p.add_argument_group("GAN")
    gan.add_argument(
        "--truncation-psi", type=float, default=None, help="StyleGAN's truncation (1: none; default: the run's)"
    )
    p.set_defaults(func=cmd_sample)
