"""`shards` command: write a source (digits, synthetic, an image folder) as tar shards with a manifest.

Wired into the main CLI as `pretrain data shards`; standalone as `python -m data_pipeline.cli shards`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence

from data_pipeline.shard_writer import IMAGE_FORMATS, write_shards
from data_pipeline.sources import (
    DIGITS_CLASSES,
    Sample,
    digits_samples,
    folder_classes,
    folder_samples,
    synthetic_classes,
    synthetic_samples,
)

DEFAULT_IMAGE_SIZE = 32


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `shards` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser("shards", help="write images as WebDataset tar shards with a manifest")
    p.add_argument("--source", required=True, choices=["digits", "synthetic", "folder"])
    p.add_argument("--out", required=True, help="output directory for the shards and manifest.json")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    p.add_argument(
        "--image-size", type=int, default=None, help=f"digits/synthetic side in pixels (default {DEFAULT_IMAGE_SIZE})"
    )
    p.add_argument("--num", type=int, default=10_000, help="synthetic: number of images (default 10000)")
    p.add_argument("--num-classes", type=int, default=10, help="synthetic: number of classes (default 10)")
    p.add_argument("--test-fraction", type=float, default=None, help="digits/synthetic: held-out fraction")
    p.add_argument("--root", help="folder: the image tree root/[train|val|test/]<class>/<image>")
    p.add_argument("--format", choices=sorted(IMAGE_FORMATS), default="png", help="encoding of rendered images")
    p.add_argument(
        "--max-side",
        type=int,
        default=None,
        help="re-encode images whose long side exceeds this many pixels to that size (recorded in the manifest)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace shards and manifest already in --out")
    p.set_defaults(func=run_shards)


def _source(args: argparse.Namespace) -> tuple[Iterator[Sample], list[str], str, int | None]:
    """(samples, class names, description, image size) for the chosen source."""
    if args.source == "folder":
        if not args.root:
            raise ValueError("--source folder needs --root")
        if args.image_size is not None:
            raise ValueError("--image-size does not apply to --source folder: original image files are kept")
        return folder_samples(args.root), folder_classes(args.root), f"folder:{args.root}", None
    if args.root:
        raise ValueError(f"--root applies only to --source folder, not {args.source}")
    size = args.image_size or DEFAULT_IMAGE_SIZE
    if args.source == "digits":
        fraction = 0.2 if args.test_fraction is None else args.test_fraction
        description = f"sklearn load_digits, bicubic to {size}px, test_fraction={fraction}, seed={args.seed}"
        return digits_samples(size, fraction, args.seed), list(DIGITS_CLASSES), description, size
    fraction = 0.0 if args.test_fraction is None else args.test_fraction
    description = f"synthetic shapes: {args.num} images, {args.num_classes} classes, seed={args.seed}"
    samples = synthetic_samples(args.num, size, args.num_classes, args.seed, fraction)
    return samples, synthetic_classes(args.num_classes), description, size


def run_shards(args: argparse.Namespace) -> int:
    try:
        samples, classes, description, size = _source(args)
        manifest = write_shards(
            samples,
            args.out,
            args.shard_size,
            args.format,
            classes=classes,
            source=description,
            image_size=size,
            overwrite=args.overwrite,
            max_side=args.max_side,
        )
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        print(f"data shards: {exc}", file=sys.stderr)
        return 2
    for split, shards in manifest.splits.items():
        print(f"{split}: {len(shards)} shards, {manifest.num_samples(split)} samples")
    if manifest.size_cap is not None:
        print(f"size cap: {manifest.size_cap['resized']} images resized to a long side of {args.max_side} px")
    print(f"manifest: {manifest.path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_pipeline.cli", description=__doc__)
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
