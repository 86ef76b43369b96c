"""`pretrain data latents`: encode image shards once into latent shards, so DiT training never runs the VAE.

Each record holds `{key}.npy`, the posterior's mean and std stacked as float32 [2, C, h, w] (the DiT
transform draws a fresh latent from them per use), and `{key}.cls`. The manifest has the image
manifest's fields plus `latent`: channels, size, the VAE, and `scale_factor` = 1 / std of the latents
of the first split (train), which brings latents to unit variance for the diffusion model.
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from data_pipeline.loader import ResumableLoader
from data_pipeline.manifest import Manifest
from data_pipeline.shard_writer import SplitWriter, clear_previous_shards
from pretrain.diffusion.transforms import pixel_transform
from pretrain.methods.vae import load_vae
from pretrain.models.vae import AutoencoderKL


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def image_source(shards: str | Path, image_size: int | None, factor: int, encoder: str) -> tuple[Manifest, int]:
    """The image shards' manifest and the side images are encoded at: `image_size`, else the manifest's; a
    multiple of the encoder's downsampling `factor`."""
    source = Manifest.load(shards)
    size = image_size or source.image_size
    if size is None:
        raise ValueError(f"{shards}: images keep their original sizes; pass image_size")
    if size % factor:
        raise ValueError(f"image size {size} is not a multiple of {encoder}'s downsampling factor {factor}")
    return source, size


def encode_splits(
    source: Manifest,
    out_dir: str | Path,
    splits: list[str],
    transform: Callable,
    encode: Callable[[str, torch.Tensor], np.ndarray],
    *,
    batch_size: int,
    shard_size: int,
    overwrite: bool,
) -> dict[str, list]:
    """Every image of `splits` (in that order) through `transform` and then `encode(split, images)`, one array
    per image, into `{key}.npy` + `{key}.cls` record shards in `out_dir`; returns each split's shards. An error
    aborts every split's writer, so no half-written shard is left to be read."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_shards(out, overwrite)
    writers: dict[str, SplitWriter] = {}
    try:
        for split in splits:
            writers[split] = writer = SplitWriter(out, split, shard_size)
            loader = ResumableLoader(
                source.shard_paths(split), batch_size=batch_size, transform=transform, shuffle_buffer=0, infinite=False
            )
            for batch in loader:
                arrays = encode(split, batch["image"])
                for key, label, array in zip(batch["key"], batch["label"].tolist(), arrays):
                    writer.write({"__key__": key, "npy": encode_npy(array), "cls": str(label).encode()})
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return {split: writer.shards for split, writer in writers.items()}


def add_encode_arguments(p: argparse.ArgumentParser, what: str) -> None:
    """The options `data latents` and `data tokens` share; `what` names a record in the help."""
    p.add_argument("--shards", required=True, help="image shard directory (or its manifest.json)")
    p.add_argument("--out", required=True, help=f"output directory for the {what} shards and manifest.json")
    p.add_argument("--image-size", type=int, default=None, help="resize images to this side (default: the manifest's)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000, help=f"{what}s per shard (default 1000)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")


@torch.no_grad()
def write_latent_shards(
    vae: AutoencoderKL,
    shards: str | Path,
    out_dir: str | Path,
    *,
    vae_name: str = "",
    image_size: int | None = None,
    batch_size: int = 64,
    shard_size: int = 1000,
    overwrite: bool = False,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Manifest:
    """Encode every split of an image shard directory; returns the latent manifest (already saved)."""
    source, size = image_source(shards, image_size, vae.downsample, "the VAE")
    vae = vae.eval().to(device)
    transform = pixel_transform(size, vae.arch.in_channels, train=False)
    generator = torch.Generator(device=device).manual_seed(seed)
    moments = {"count": 0, "sum": 0.0, "sum_sq": 0.0}
    splits = sorted(source.splits, key=lambda s: s != "train")  # train first: it defines the scale

    def encode(split: str, images: torch.Tensor) -> np.ndarray:
        posterior = vae.encode(images.to(device))
        if split == splits[0]:
            z = posterior.sample(generator).double()
            moments["count"] += z.numel()
            moments["sum"] += z.sum().item()
            moments["sum_sq"] += z.pow(2).sum().item()
        return torch.stack([posterior.mean, posterior.std], dim=1).float().cpu().numpy()

    written = encode_splits(
        source, out_dir, splits, transform, encode, batch_size=batch_size, shard_size=shard_size, overwrite=overwrite
    )
    mean = moments["sum"] / moments["count"]
    std = math.sqrt(max(moments["sum_sq"] / moments["count"] - mean**2, 1e-12))
    latent_side = size // vae.downsample
    manifest = Manifest(
        root=Path(out_dir),
        source=f"latents of {source.root} ({source.source}) by the VAE {vae_name}",
        classes=source.classes,
        image_size=size,
        splits=written,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        latent={
            "vae": vae_name,
            "channels": vae.arch.latent_channels,
            "size": latent_side,
            "downsample": vae.downsample,
            "stored": "float32 [2, C, h, w]: posterior mean, posterior std",
            "mean": mean,
            "std": std,
            "scale_factor": 1.0 / std,
        },
    )
    manifest.save()
    return manifest


def run_latents(args: argparse.Namespace) -> int:
    try:
        vae = load_vae(args.vae)
        manifest = write_latent_shards(
            vae,
            args.shards,
            args.out,
            vae_name=str(args.vae),
            image_size=args.image_size,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            overwrite=args.overwrite,
            device=args.device,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"data latents: {exc}", file=sys.stderr)
        return 2
    latent = manifest.latent or {}
    for split, shards in manifest.splits.items():
        print(f"{split}: {len(shards)} shards, {manifest.num_samples(split)} latents")
    print(
        f"latents {latent['channels']}x{latent['size']}x{latent['size']}, scale_factor {latent['scale_factor']:.5f}; "
        f"manifest: {manifest.path}"
    )
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("latents", help="encode image shards into VAE latent shards (for DiT training)")
    p.add_argument("--vae", required=True, help="a vae run/checkpoint, or a diffusers AutoencoderKL directory")
    add_encode_arguments(p, "latent")
    p.set_defaults(func=run_latents)
