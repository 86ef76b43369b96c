"""Where should joint-embedding color augmentation run: per sample in the data workers, or batched on the
device after transfer? Both paths produce DINO multi-crop batches (2 global + N local views) from the same
shards with the same crops; only where jitter, grayscale, blur and solarization happen differs.

    python benchmarks/augment_placement.py --device cpu --num 1024 --image-size 96 --local-crops 6 --workers 2

`workers`: the full pipeline per sample in DataLoader workers. `device`: the workers crop and flip only,
and `DeviceColor` augments whole batches on --device. Passes alternate; the best of each is reported, as
samples/s and the ratio device / workers. JSON to benchmarks/results/augment_placement_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from data_pipeline.loader import ResumableLoader
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import synthetic_classes, synthetic_samples
from data_pipeline.views import DeviceColor, MultiView, joint_embedding_views
from pretrain.recipes import load_config

from machine import device_info

RESULTS = Path(__file__).resolve().parent / "results"


def one_pass(shards: str, args: argparse.Namespace, on_device: bool) -> float:
    data = load_config(
        None,
        [
            f"data.image_size={args.image_size}",
            f"data.local_crops={args.local_crops}",
            f"data.local_crop_size={args.image_size // 2}",
            "model.patch_size=8",
        ],
    ).data
    views = joint_embedding_views(data)
    transform = MultiView(views, data.hflip, data.mean, data.std, color_in_workers=not on_device)
    device_color = DeviceColor(views, data.mean, data.std) if on_device else None
    loader = ResumableLoader(
        shards,
        batch_size=args.batch_size,
        transform=transform,
        num_workers=args.workers,
        shuffle_buffer=0,
        infinite=False,
        pin_memory=args.device == "cuda",
    )
    device = torch.device(args.device)
    started, count = time.perf_counter(), 0
    for batch in loader:
        images = [v.to(device, non_blocking=True) for v in batch["image"]]
        if device_color is not None:
            images = device_color({"image": images})["image"]
        if device.type == "cuda":
            torch.cuda.synchronize()
        count += images[0].shape[0]
    if count != args.num:
        raise RuntimeError(f"read {count} samples, expected {args.num}")
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--num", type=int, default=1024)
    parser.add_argument("--image-size", type=int, default=96, help="global crop size (local crops are half)")
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        samples = synthetic_samples(args.num, int(args.image_size * 1.25), seed=0)
        write_shards(samples, Path(tmp), max(1, args.num // 8), classes=synthetic_classes(10), source="benchmark")
        shards = str(Path(tmp) / "manifest.json")
        timings: dict[str, list[float]] = {"workers": [], "device": []}
        for _ in range(args.repeats):
            for mode in timings:
                timings[mode].append(one_pass(shards, args, on_device=mode == "device"))
    rates = {mode: args.num / min(seconds) for mode, seconds in timings.items()}
    info = device_info(args.device)
    record = {
        "benchmark": "augment_placement",
        "device": info,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "parameters": vars(args),
        "results": {mode: {"samples_per_sec": rates[mode], "pass_seconds": timings[mode]} for mode in timings},
        "ratio_device_over_workers": rates["device"] / rates["workers"],
    }
    out = Path(args.out) / f"augment_placement_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(
        f"augment_placement on {args.device}: 2x{args.image_size}px + {args.local_crops}x{args.image_size // 2}px views, "
        f"{args.workers} workers: in workers {rates['workers']:.0f} samples/s, batched on the device "
        f"{rates['device']:.0f} samples/s, ratio {record['ratio_device_over_workers']:.2f}x"
    )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
