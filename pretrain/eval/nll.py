"""`pretrain eval nll`: the negative log-likelihood of a likelihood model's checkpoint (PixelCNN) on a split,
in bits per dimension, the number the autoregressive-model papers compare (a uniform model scores 8)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from data_pipeline.loader import ResumableLoader
from pretrain.ckpt.load import load_method
from pretrain.config import UserError
from pretrain.engines.base import resolve_device
from pretrain.methods.pixelcnn import PixelCNNMethod, eval_transform
from pretrain.runtime.world import WorldInfo


@torch.no_grad()
def evaluate_nll(
    checkpoint: str | Path, shards: str = "", split: str = "test", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Mean NLL over every image of `split` (whole images, resized, no augmentation): nats and bits per
    dimension, summed in float64 over images so the order of batches does not matter."""
    cfg, method, path = load_method(checkpoint, False, overrides)
    if not isinstance(method, PixelCNNMethod):
        raise UserError(
            f"{path} was trained with method.name={cfg.method.name!r}; `eval nll` takes a pixelcnn checkpoint"
        )
    device = resolve_device(cfg.run.device, WorldInfo())
    method.to(device)
    shards = shards or cfg.eval.shards or cfg.data.shards
    try:
        loader = ResumableLoader(
            shards, batch_size=cfg.eval.batch_size, transform=eval_transform(cfg), seed=cfg.run.seed,
            shuffle_buffer=0, infinite=False, split=split,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:  # no such split, no shards
        raise UserError(f"--split/--shards: {exc}") from exc
    total, images, started = 0.0, 0, time.perf_counter()
    dims = 0
    for batch in loader:
        x = batch["image"].to(device)
        labels = batch["label"].to(device) if method.model.num_classes else None
        nll = method.model.nll(method.model(x, labels), x)
        total += float(nll.double().sum())
        images += x.shape[0]
        dims = x[0].numel()
    if images == 0:
        raise UserError(f"--shards: no {split} images in {shards}")
    nats_per_dim = total / (images * dims)
    return {
        "checkpoint": str(path),
        "split": split,
        "images": images,
        "dims_per_image": dims,
        "nats_per_dim": nats_per_dim,
        "bits_per_dim": nats_per_dim / math.log(2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def cmd_nll(args: argparse.Namespace) -> int:
    report = evaluate_nll(args.checkpoint, args.shards, args.split, args.overrides)
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{report['bits_per_dim']:.4f} bits/dim ({report['nats_per_dim']:.4f} nats/dim) on "
            f"{report['images']} {report['split']} images of {report['dims_per_image']} dims"
        )
    return 0


def register(eval_commands: argparse._SubParsersAction) -> None:
    p = eval_commands.add_parser("nll", help="test negative log-likelihood of a PixelCNN checkpoint, in bits/dim")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--shards", default="", help="evaluation shards (default: eval.shards, else the training data)")
    p.add_argument("--split", default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_nll)
