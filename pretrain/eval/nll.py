"""`pretrain eval nll`: the negative log-likelihood of a likelihood model's checkpoint on a split: a PixelCNN's in
bits per dimension, the number the autoregressive-model papers compare (a uniform model scores 8), and a token
transformer's in bits per token (log2 of the codebook size for a uniform model)."""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from data_pipeline.loader import ResumableLoader
from pretrain.ckpt.load import load_method
from pretrain.config import UserError
from pretrain.engines.base import resolve_device
from pretrain.methods.gpt import TokenAutoregressive
from pretrain.methods.gpt import train_transform as token_train_transform
from pretrain.methods.pixelcnn import PixelCNNMethod, eval_transform
from pretrain.runtime.world import WorldInfo


def _scorer(cfg, method) -> tuple[Callable, Callable[[dict], Tensor], str]:
    """(eval transform, batch -> NLL per sample in nats, the unit the NLL is reported per)."""
    if isinstance(method, PixelCNNMethod):
        model = method.model

        def pixels(batch: dict) -> Tensor:
            labels = batch["label"] if model.num_classes else None
            return model.nll(model(batch["image"], labels), batch["image"])

        return eval_transform(cfg), pixels, "dim"
    if isinstance(method, TokenAutoregressive):
        return (
            token_train_transform(cfg),
            lambda batch: method.model.nll(method.tokens_of(batch), batch["label"]),
            "token",
        )
    raise UserError(
        f"the checkpoint was trained with method.name={cfg.method.name!r}; `eval nll` takes a pixelcnn or gpt checkpoint"
    )


@torch.no_grad()
def evaluate_nll(
    checkpoint: str | Path, shards: str = "", split: str = "test", overrides: list[str] | None = None
) -> dict[str, Any]:
    """Mean NLL over every sample of `split` (whole images, resized, no augmentation; token grids as stored): nats
    and bits per dimension (PixelCNN) or per token (token transformer, with the true labels), summed in float64
    over samples so the order of batches does not matter."""
    cfg, method, path = load_method(checkpoint, False, overrides)
    transform, nll_of, unit = _scorer(cfg, method)
    device = resolve_device(cfg.run.device, WorldInfo())
    method.to(device)
    shards = shards or cfg.eval.shards or cfg.data.shards
    try:
        loader = ResumableLoader(
            shards, batch_size=cfg.eval.batch_size, transform=transform, seed=cfg.run.seed,
            shuffle_buffer=0, infinite=False, split=split,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:  # no such split, no shards
        raise UserError(f"--split/--shards: {exc}") from exc
    total, images, started = 0.0, 0, time.perf_counter()
    dims = 0
    for batch in loader:
        batch = {"image": batch["image"].to(device), "label": batch["label"].to(device)}
        total += float(nll_of(batch).double().sum())
        images += batch["image"].shape[0]
        dims = batch["image"][0].numel()
    if images == 0:
        raise UserError(f"--shards: no {split} images in {shards}")
    nats = total / (images * dims)
    return {
        "checkpoint": str(path),
        "split": split,
        "images": images,
        "unit": unit,
        f"{unit}s_per_image": dims,
        f"nats_per_{unit}": nats,
        f"bits_per_{unit}": nats / math.log(2),
        "seconds": round(time.perf_counter() - started, 2),
    }


def cmd_nll(args: argparse.Namespace) -> int:
    report = evaluate_nll(args.checkpoint, args.shards, args.split, args.overrides)
    if args.json:
        print(json.dumps(report))
    else:
        unit = report["unit"]
        print(
            f"{report[f'bits_per_{unit}']:.4f} bits/{unit} ({report[f'nats_per_{unit}']:.4f} nats/{unit}) on "
            f"{report['images']} {report['split']} images of {report[f'{unit}s_per_image']} {unit}s"
        )
    return 0


def register(eval_commands: argparse._SubParsersAction) -> None:
    p = eval_commands.add_parser(
        "nll", help="test negative log-likelihood of a PixelCNN (bits/dim) or token-transformer (bits/token) checkpoint"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a run directory (its latest)")
    p.add_argument("--shards", default="", help="evaluation shards (default: eval.shards, else the training data)")
    p.add_argument("--split", default="test")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.set_defaults(func=cmd_nll)
