"""`pretrain viz pca`: DINOv2's pictures of what a checkpoint's ViT encoder sees (Oquab et al. 2024, figure 1):
a PCA of its patch features over a few evaluation images, the first component thresholded into foreground
and background, three more components of the foreground as colours (pretrain/visualize.py: patch_pca_rgb)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from pretrain.checkpoint import read_meta
from pretrain.ckpt.load import load_method
from pretrain.config import UserError
from pretrain.data import build_eval_loader
from pretrain.engines.base import resolve_device
from pretrain.models.vit import VisionTransformer
from pretrain.runtime.world import WorldInfo
from pretrain.visualize import pca_grid


def pca_picture(
    checkpoint: str | Path,
    out: str | Path,
    shards: str = "",
    num: int = 8,
    split: str = "test",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Write the picture of the first `num` images of `split` to `out` (PNG); -> a report."""
    if num < 1:
        raise UserError(f"--num: at least 1 image, got {num}")
    cfg, method, path = load_method(checkpoint, False, overrides)
    encoder = method.inference_network()
    if not isinstance(encoder, VisionTransformer):
        raise UserError(
            f"{path}: a {cfg.method.name!r} checkpoint whose encoder is a {type(encoder).__name__}; PCA pictures "
            "need a ViT's patch features"
        )
    device = resolve_device(cfg.run.device, WorldInfo())
    encoder = encoder.to(device).eval()
    shards = shards or cfg.eval.shards or cfg.data.shards
    images = []
    for batch in build_eval_loader(cfg, shards, split):
        images.append(batch["image"])
        if sum(len(b) for b in images) >= num:
            break
    if not images:
        raise UserError(f"--shards: no {split} images in {shards}")
    batch = torch.cat(images)[:num].to(device)
    picture, foreground = pca_grid(encoder, batch, cfg.data.mean, cfg.data.std)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture.numpy()).save(out)
    share = float(foreground.float().mean())
    report = {
        "checkpoint": str(path),
        "step": read_meta(path)["step"],
        "out": str(out),
        "images": len(batch),
        "grid": list(foreground.shape[1:]),
        "foreground_share": share,
    }
    report["summary"] = (
        f"wrote {out}: {len(batch)} {split} images over their PCA maps (step {report['step']}, "
        f"{foreground.shape[1]} x {foreground.shape[2]} patches each, {100 * share:.0f}% of them foreground)"
    )
    return report


def cmd_viz_pca(args: argparse.Namespace) -> int:
    report = pca_picture(args.checkpoint, args.out, args.shards, args.num, args.split, args.overrides)
    print(json.dumps(report) if args.json else report["summary"])
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    viz = commands.add_parser("viz", help="pictures of what a checkpoint learned")
    viz_commands = viz.add_subparsers(dest="viz_command", required=True)
    pca = viz_commands.add_parser(
        "pca", help="PCA of a ViT's patch features: foreground by the first component, three more as RGB (DINOv2)"
    )
    pca.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    pca.add_argument("--shards", default="", help="images to show (default: eval.shards, else the training data)")
    pca.add_argument("--out", required=True, help="PNG to write")
    pca.add_argument("--num", type=int, default=8, help="images in the picture (default 8)")
    pca.add_argument("--split", default="test", choices=["train", "test"])
    pca.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    pca.add_argument("--json", action="store_true", help="print the report as JSON")
    pca.set_defaults(func=cmd_viz_pca)
