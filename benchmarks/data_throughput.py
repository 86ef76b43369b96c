"""Data-path throughput on ImageNet-like JPEGs, in one run:

1. per-core images/s (images per CPU-second) of each decode + augment path, one process, one thread,
   as ratios against plain PIL (decode + random resized crop + flip + normalize) measured in the same run: the reference and
   fast transforms for MAE (1x224), MoCo v3 (2x224) and DINO (2x224 + 10x96, color on the device),
   the default loader and the fast loader over shards, DALI on the CPU, and DALI on the GPU when
   there is one;
2. shards vs per-file reads, warm and cold page cache (cold: every file's cached pages are dropped
   with posix_fadvise(POSIX_FADV_DONTNEED) before each pass; that needs no root, and works because the
   files were written and synced: clean pages are evicted);
3. the CPU cores per GPU each recipe needs: the images/s one GPU consumes at 50% MFU of an H100 (989
   dense bf16 TFLOP/s), from the analytic training FLOPs of pretrain/flops.py, divided by the per-core
   rate of the recipe's data path.

    python benchmarks/data_throughput.py                                    # 256 generated 500x375 q90 JPEGs
    python benchmarks/data_throughput.py --folder /data/imagenet/train --num 1000   # a folder of JPEGs

(with the project installed, `pip install -e .`, or PYTHONPATH set to the repository root)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, mae_transform
from data_pipeline.dali_loader import dali_available
from data_pipeline.decode import EncodedImage, decode_image
from data_pipeline.fast_crops import CropView, FastCrops
from data_pipeline.loader import ResumableLoader
from data_pipeline.photo_like import photo_like_samples
from data_pipeline.reader import derive_seed
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import Sample
from data_pipeline.views import ColorAugment, MultiView, ViewSpec, joint_embedding_views

from machine import device_info

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
H100_BF16_TFLOPS = 989.0
TARGET_MFU = 0.5
DALI_SETTLE_S = 2.0
# (name, config, overrides, data path): which per-core rate feeds the recipe
RECIPES = [
    ("MAE ViT-B/16", "configs/mae_vit_b16.toml", [], "mae"),
    ("MAE ViT-L/16", "configs/mae_vit_b16.toml", ["model.size=large"], "mae"),
    ("DINO ViT-S/16 (2x224+10x96)", "configs/dino_vit_s16.toml", [], "dino"),
    ("MoCo v3 ViT-B/16", "configs/moco_v3_vit_b16.toml", [], "moco"),
    ("DiT-XL/2", "configs/dit_xl2.toml", [], None),
]


# ---------------------------------------------------------------------------------------------- data


def load_images(args: argparse.Namespace) -> list[Sample]:
    """JPEG samples: generated photo-like ones, or the first --num JPEGs under --folder (sorted)."""
    if not args.folder:
        return list(photo_like_samples(args.num, args.width, args.height, args.quality))
    files = sorted(p for p in Path(args.folder).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))[: args.num]
    if not files:
        raise SystemExit(f"no .jpg/.jpeg files under {args.folder}")
    return [Sample(f"img_{i:07d}", None, 0, "train", data=p.read_bytes(), ext="jpg") for i, p in enumerate(files)]


def write_both(samples: list[Sample], root: Path, shard_size: int) -> tuple[list[str], list[str]]:
    """The same bytes as shards and as one file per image, synced so their pages can be dropped."""
    folder = root / "files"
    folder.mkdir(parents=True)
    files = []
    for sample in samples:
        path = folder / f"{sample.key}.jpg"
        path.write_bytes(sample.data)
        files.append(str(path))
    shards = write_shards(samples, root / "shards", shard_size, source="benchmark").shard_paths("train")
    os.sync()
    return shards, files


def drop_cached_pages(paths: list[str]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------------------ transforms


def view_sets() -> dict[str, list[tuple[int, tuple[float, float]]]]:
    """(size, crop scale) of every view, per method, from the recipes' own data sections."""
    from pretrain.recipes import load_config

    sets = {"mae": [(224, load_config(ROOT / "configs/mae_vit_b16.toml").data.crop_scale)]}
    for method, config in (("moco", "configs/moco_v3_vit_b16.toml"), ("dino", "configs/dino_vit_s16.toml")):
        data = load_config(ROOT / config).data
        sets[method] = [(view.size, view.scale) for view in joint_embedding_views(data)]
    return sets


def reference_transform(views: list[tuple[int, tuple[float, float]]]) -> Callable:
    """What the default path runs: full PIL decode, PIL crops, float tensors (color on the device)."""
    if len(views) == 1:
        return mae_transform(views[0][0], views[0][1])
    specs = [ViewSpec(size, scale, ColorAugment()) for size, scale in views]  # color: on the device, not here
    return MultiView(specs, 0.5, IMAGENET_MEAN, IMAGENET_STD, color_in_workers=False)


def fast_transform(views: list[tuple[int, tuple[float, float]]]) -> FastCrops:
    return FastCrops([CropView(s, sc) for s, sc in views], single=len(views) == 1)


# --------------------------------------------------------------------------------------------- timing


def best_rate(run: Callable[[], int], repeats: int, clock: Callable[[], float] = time.perf_counter):
    """(images/s of the fastest pass, every pass's seconds); `run` returns how many images it made."""
    seconds = []
    for _ in range(repeats):
        start = clock()
        count = run()
        seconds.append(clock() - start)
    return count / min(seconds), seconds


def per_image(samples: list[Sample], transform: Callable, encoded: bool) -> Callable[[], int]:
    def run() -> int:
        for sample in samples:
            gen = torch.Generator().manual_seed(derive_seed(0, "augment", 0, sample.key))
            image = EncodedImage(sample.data, sample.key) if encoded else decode_image(sample.data, sample.key)
            transform(image, gen)
        return len(samples)

    return run


def over_shards(shards: list[str], transform: Callable, batch_size: int, workers: int = 0) -> Callable[[], int]:
    def run() -> int:
        loader = ResumableLoader(
            shards, batch_size=batch_size, transform=transform, num_workers=workers, infinite=False
        )
        return sum(len(batch["key"]) for batch in loader)

    return run


def over_files(files: list[str], transform: Callable, batch_size: int, workers: int) -> Callable[[], int]:
    def run() -> int:
        loader = DataLoader(
            FileImages(files, transform),
            batch_size=batch_size,
            shuffle=True,
            num_workers=workers,
            prefetch_factor=2 if workers else None,
        )
        return sum(len(keys) for _, keys in loader)

    return run


class FileImages(Dataset):
    """The per-file baseline: one JPEG per sample, decoded and augmented like the sharded path."""

    def __init__(self, files: list[str], transform: Callable) -> None:
        self.files, self.transform = files, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        with open(path, "rb") as f:
            image = EncodedImage(f.read(), path)
        key = Path(path).stem
        return self.transform(image, torch.Generator().manual_seed(derive_seed(0, "augment", 0, key))), key


def over_dali(shards: list[str], views, batch_size: int, device: str, num: int) -> Callable[[], int]:
    from data_pipeline.dali_loader import DaliLoader

    loader = DaliLoader(shards, batch_size=batch_size, views=views, single=len(views) == 1, device=device)
    batches = iter(loader)
    next(batches)  # build the pipeline and fill its queues outside the timing

    def run() -> int:
        count = 0
        while count < num:
            batch = next(batches)
            view = batch["image"] if torch.is_tensor(batch["image"]) else batch["image"][0]
            count += view.shape[0]
        if device == "cuda":
            torch.cuda.synchronize()
        return count

    return run


# ------------------------------------------------------------------------------------------- sections


def measure_per_core(samples, shards, args, views) -> dict[str, dict]:
    paths: dict[str, Callable[[], int]] = {}
    for method in ("mae", "moco", "dino"):  # each fast path right after its reference, so drift hits both
        paths[f"plain_pil_{method}"] = per_image(samples, reference_transform(views[method]), False)
        paths[f"fast_{method}"] = per_image(samples, fast_transform(views[method]), True)
    paths["default_loader_mae"] = over_shards(shards, reference_transform(views["mae"]), args.batch_size)
    paths["fast_loader_mae"] = over_shards(shards, fast_transform(views["mae"]), args.batch_size)
    paths["fast_loader_dino"] = over_shards(shards, fast_transform(views["dino"]), args.batch_size)
    skipped: dict[str, str] = {}
    if (why := dali_available()) is None:
        for method in ("mae", "dino"):
            paths[f"dali_cpu_{method}"] = over_dali(shards, views[method], args.batch_size, "cpu", len(samples))
            if torch.cuda.is_available():
                paths[f"dali_gpu_{method}"] = over_dali(shards, views[method], args.batch_size, "cuda", len(samples))
            else:
                skipped[f"dali_gpu_{method}"] = "no CUDA device"
    else:
        skipped["dali_cpu_mae"] = skipped["dali_gpu_mae"] = why
    for name, run in paths.items():  # one untimed pass each: first-call costs (allocations, page faults)
        if not name.startswith("dali"):  # DALI warmed up when its pipeline was built
            run()
    rates = {name: [] for name in paths}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):  # alternate paths, so drift in machine load hits all alike
        for name, run in paths.items():
            # CPU seconds of this process (all its threads, DALI's included): what a path costs a core,
            # whatever else shares the machine
            rate, passes = best_rate(run, 1, time.process_time)
            rates[name].append(rate)
            seconds[name] += passes
            if name.startswith("dali"):
                time.sleep(DALI_SETTLE_S)  # its threads refill the prefetch queue: not on the next path's clock
    baseline = max(rates["plain_pil_mae"])
    out = {}
    for name in paths:
        method = name.rsplit("_", 1)[1]
        reference = max(rates[f"plain_pil_{method}"])
        out[name] = {
            "images_per_sec": max(rates[name]),
            "pass_cpu_seconds": seconds[name],
            "vs_plain_pil_mae": max(rates[name]) / baseline,
            f"vs_plain_pil_{method}": max(rates[name]) / reference,
        }
    for name, why in skipped.items():
        out[name] = {"skipped": why}
    return out


class ReadOnly:
    """Reads the record and the image header, decodes nothing: what the storage layout alone costs."""

    accepts_encoded = True

    def __call__(self, image: EncodedImage, gen: torch.Generator) -> torch.Tensor:
        return torch.tensor(image.size)


def measure_storage(shards, files, args) -> dict:
    transform = ReadOnly()
    results = {}
    for mode in ("warm", "cold"):
        timings: dict[str, list[float]] = {"sharded": [], "files": []}
        for _ in range(args.repeats):
            for name, run, paths in (
                ("files", over_files(files, transform, args.batch_size, args.workers), files),
                ("sharded", over_shards(shards, transform, args.batch_size, args.workers), shards),
            ):
                if mode == "cold":
                    drop_cached_pages(paths)
                _, passes = best_rate(run, 1)
                timings[name] += passes
        rates = {name: len(files) / min(s) for name, s in timings.items()}
        results[mode] = {
            "sharded_images_per_sec": rates["sharded"],
            "files_images_per_sec": rates["files"],
            "ratio_sharded_over_files": rates["sharded"] / rates["files"],
            "pass_seconds": timings,
        }
    return results


def cores_per_gpu(per_core: dict[str, dict]) -> list[dict]:
    from pretrain.methods.registry import flops_per_sample
    from pretrain.recipes import load_config

    rows = []
    for name, config, overrides, method in RECIPES:
        cfg = load_config(ROOT / config, overrides)
        gflop = flops_per_sample(cfg)["train"] / 1e9
        per_gpu = TARGET_MFU * H100_BF16_TFLOPS * 1e12 / (gflop * 1e9)
        row = {"recipe": name, "config": config, "overrides": overrides, "train_gflop_per_sample": gflop}
        row["images_per_sec_per_gpu"] = per_gpu
        if method is None:
            row["note"] = "latent shards: no image decoding (reading .npy latents)"
        else:
            for path in (f"plain_pil_{method}", f"fast_{method}", f"dali_cpu_{method}"):
                rate = per_core.get(path, {}).get("images_per_sec")
                if rate:
                    row[f"cores_{path}"] = per_gpu / rate
        rows.append(row)
    return rows


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for package in ("torch", "pillow", "simplejpeg", "webdataset", "nvidia-dali-cuda120"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = "not installed"
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=256, help="number of images")
    parser.add_argument("--folder", help="measure these JPEGs (searched recursively) instead of generated ones")
    parser.add_argument("--width", type=int, default=500)
    parser.add_argument("--height", type=int, default=375)
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--workers", type=int, default=0, help="DataLoader workers for shards vs files (0: no worker start-up cost)"
    )
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per path (best is reported)")
    parser.add_argument("--skip-storage", action="store_true", help="per-core rates and cores per GPU only")
    parser.add_argument("--workdir", help="where to write shards and files (default: a temporary directory)")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    args = parser.parse_args()

    torch.set_num_threads(1)  # per-core rates: one thread in one process
    samples = load_images(args)
    views = view_sets()
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        shards, files = write_both(samples, Path(tmp), args.shard_size)
        per_core = measure_per_core(samples, shards, args, views)
        storage = None if args.skip_storage else measure_storage(shards, files, args)

    device = device_info("cuda" if torch.cuda.is_available() else "cpu")
    command = ["python", str(Path(sys.argv[0]).resolve().relative_to(ROOT)), *sys.argv[1:]]
    if args.folder:
        command[command.index(args.folder)] = "FOLDER"
    mean_kb = sum(len(s.data) for s in samples) / len(samples) / 1024
    result = {
        "benchmark": "data_throughput",
        "device": device,
        "versions": versions(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join(command),
        "images": {
            "source": "folder" if args.folder else f"generated photo-like, {args.width}x{args.height}, q{args.quality}",
            "count": len(samples),
            "mean_kb": mean_kb,
        },
        "per_core": per_core,
        "storage": storage,
        "cores_per_gpu": cores_per_gpu(per_core),
        "notes": {
            "per_core": "images per CPU-second of this process (time.process_time over a pass, all threads: "
            "robust to other load on the machine), best of --repeats passes; one process, "
            "torch.set_num_threads(1), no DataLoader workers; fast paths hand uint8 to the device, so their "
            "figures exclude float conversion and normalization (done on the GPU); DALI runs with num_threads=1 "
            "plus its own executor thread, both counted",
            "cores_per_gpu": f"images/s one GPU consumes at {TARGET_MFU:.0%} MFU of {H100_BF16_TFLOPS} TFLOP/s "
            "divided by the per-core rate; DINO and MoCo color augmentation runs on the GPU and is not counted",
            "storage": "wall-clock images/s of a DataLoader with --workers workers reading records and image headers "
            "only (no decoding), so the storage layout is what differs; cold: posix_fadvise DONTNEED on every file "
            "before each pass",
        },
    }
    out = Path(args.out) / f"data_throughput_{device['type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    base = per_core["plain_pil_mae"]["images_per_sec"]
    summary = ", ".join(
        f"{name} {r['images_per_sec']:.0f}/s ({r['vs_plain_pil_mae']:.2f}x)"
        for name, r in per_core.items()
        if "images_per_sec" in r and name != "plain_pil_mae"
    )
    print(
        f"data_throughput: {len(samples)} JPEGs ({mean_kb:.0f} KB) on {device['cpu_model']}, per core: "
        f"plain PIL MAE {base:.0f}/s; {summary}"
    )
    if storage:
        print(
            "storage (sharded/per-file): "
            + ", ".join(f"{m} {r['ratio_sharded_over_files']:.2f}x" for m, r in storage.items())
        )
    print(f"-> {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
