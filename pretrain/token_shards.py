"""`pretrain data tokens`: encode image shards once into token shards with a trained VQ tokenizer, so the token
transformer (method `gpt`) never runs the tokenizer while it trains.

Each record holds `{key}.npy`, the image's codebook indices as an integer array [h, w] (int16 when the codebook
has at most 32,768 codes, else int32), and `{key}.cls`. The manifest has the image manifest's fields plus
`tokens`: the tokenizer, `num_codes`, the grid side `size`, and per split the fraction of codes used and the
perplexity of the code histogram (how much of the codebook the data reaches).
"""

from __future__ import annotations

import argparse
import math
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from data_pipeline.manifest import Manifest
from pretrain.diffusion.transforms import pixel_transform
from pretrain.latent_shards import add_encode_arguments, encode_splits, image_source
from pretrain.methods.vq import load_tokenizer
from pretrain.models.vqvae import VQAutoencoder


def token_dtype(num_codes: int) -> np.dtype:
    return np.dtype(np.int16) if num_codes <= 2**15 else np.dtype(np.int32)


def code_statistics(counts: torch.Tensor) -> dict[str, float]:
    """Fraction of the codebook used at least once, and the perplexity exp(H) of the code histogram."""
    total = counts.sum()
    if total == 0:
        return {"usage": 0.0, "perplexity": 0.0}
    p = counts[counts > 0].double() / total
    return {"usage": float((counts > 0).double().mean()), "perplexity": math.exp(float(-(p * p.log()).sum()))}


@torch.no_grad()
def write_token_shards(
    tokenizer: VQAutoencoder,
    shards: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_name: str = "",
    image_size: int | None = None,
    batch_size: int = 64,
    shard_size: int = 1000,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
) -> Manifest:
    """Tokenize every split of an image shard directory; returns the token manifest (already saved)."""
    factor = tokenizer.downsample_factor
    source, size = image_source(shards, image_size, factor, "the tokenizer")
    num_codes = tokenizer.quantizer.num_codes
    dtype = token_dtype(num_codes)
    tokenizer = tokenizer.eval().to(device)  # eval: no codebook update, no restart
    transform = pixel_transform(size, tokenizer.arch.in_channels, train=False)
    splits = sorted(source.splits)
    counts = {split: torch.zeros(num_codes, dtype=torch.long) for split in splits}

    def encode(split: str, images: torch.Tensor) -> np.ndarray:
        indices = tokenizer.encode(images.to(device))[1].cpu()
        counts[split] += torch.bincount(indices.flatten(), minlength=num_codes)
        return indices.numpy().astype(dtype)

    written = encode_splits(
        source, out_dir, splits, transform, encode, batch_size=batch_size, shard_size=shard_size, overwrite=overwrite
    )
    manifest = Manifest(
        root=Path(out_dir),
        source=f"tokens of {source.root} ({source.source}) by the VQ tokenizer {tokenizer_name}",
        classes=source.classes,
        image_size=size,
        splits=written,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        tokens={
            "tokenizer": tokenizer_name,
            "num_codes": num_codes,
            "size": size // factor,
            "downsample": factor,
            "stored": f"{dtype.name} [h, w]: codebook indices in raster order",
            "codes": {split: code_statistics(count) for split, count in counts.items()},
        },
    )
    manifest.save()
    return manifest


def run_tokens(args: argparse.Namespace) -> int:
    try:
        tokenizer = load_tokenizer(args.tokenizer)
        manifest = write_token_shards(
            tokenizer,
            args.shards,
            args.out,
            tokenizer_name=str(args.tokenizer),
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"data tokens: {exc}", file=sys.stderr)
        return 2
    tokens = manifest.tokens or {}
    for split, shards in manifest.splits.items():
        codes = tokens["codes"][split]
        print(
            f"{split}: {len(shards)} shards, {manifest.num_samples(split)} token grids, "
            f"{100 * codes['usage']:.1f}% of codes used, perplexity {codes['perplexity']:.1f}"
        )
    side = tokens["size"]
    print(f"tokens {side}x{side} of {tokens['num_codes']} codes; manifest: {manifest.path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("tokens", help="encode image shards into VQ token shards (for the token transformer)")
    p.add_argument("--tokenizer", required=True, help="a vq run directory or checkpoint")
    add_encode_arguments(p, "token grid")
    p.set_defaults(func=run_tokens)
