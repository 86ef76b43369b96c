"""Shards for benchmarks/gpu_check.sh: ImageNet-sized photo-like JPEG shards, and latent shards encoded
from them by a randomly initialized f8c4 VAE (the latents' values do not matter for throughput; their
shape, 4x32x32 at 256 px, and the shard format do).

    python benchmarks/gpu_check_data.py OUT_DIR [--num 512] [--device cuda]

writes OUT_DIR/images (JPEG shards + manifest) and OUT_DIR/latents (latent shards + manifest).
"""

from __future__ import annotations

import argparse
import sys
from multiprocessing import Pool
from pathlib import Path

from data_pipeline.photo_like import photo_like_samples
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import Sample


def _chunk(args: tuple[int, int]) -> list[Sample]:
    start, count = args
    return [
        Sample(f"photo_{start + i:07d}", None, s.label, "train", data=s.data, ext="jpg")
        for i, s in enumerate(photo_like_samples(count, seed=start))
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="output directory")
    parser.add_argument("--num", type=int, default=512)
    parser.add_argument("--shard-size", type=int, default=16)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--processes", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)

    per = max(1, args.num // args.processes)
    with Pool(args.processes) as pool:
        chunks = pool.map(_chunk, [(start, min(per, args.num - start)) for start in range(0, args.num, per)])
    samples = [s for chunk in chunks for s in chunk]
    images = write_shards(samples, out / "images", args.shard_size, source="gpu_check photo-like", overwrite=True)
    print(f"images: {images.num_samples('train')} JPEGs in {len(images.splits['train'])} shards -> {images.path}")

    from pretrain.latent_shards import write_latent_shards
    from pretrain.models.vae import AutoencoderKL

    latents = write_latent_shards(
        AutoencoderKL(),
        out / "images",
        out / "latents",
        image_size=256,
        shard_size=args.shard_size,
        device=args.device,
        overwrite=True,
        vae_name="random-init f8c4 (throughput only)",
    )
    print(f"latents: {latents.num_samples('train')} in {len(latents.splits['train'])} shards -> {latents.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
