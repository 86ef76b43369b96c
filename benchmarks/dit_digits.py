"""Class-conditional DiT on real digits, on CPU: does guidance make samples more recognizable, and how close
are they to real digits?

Writes the digits as 16 px shards, trains `configs/dit_digits.toml` (a 6-block DiT of width 128, rectified
flow in pixel space, EMA) through the normal train loop, then scores EMA samples of every class at
guidance scales s = 1, 1.5, 2, 3, 5 of the DiT paper (1 = no guidance; Heun at s = 3) with a small CNN trained here on the real
training digits:
  - class accuracy: the fraction of samples of class c that the classifier calls c;
  - Frechet distance in the classifier's 128-d feature space to the real training digits.
The same scores are reported for the untrained network (adaLN-Zero: it predicts zero velocity, so its
"samples" are the initial noise) and for the real held-out test digits (the floor).

    OMP_NUM_THREADS=1 python benchmarks/dit_digits.py    # 11 min measured on a shared 2-core VM
    python benchmarks/dit_digits.py --steps 200 --per-class 10   # a quick smoke run

(with the project installed, `pip install -e .`, or PYTHONPATH set to the repository root)
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
from PIL import Image

from data_pipeline.manifest import Manifest
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import DIGITS_CLASSES, digits_samples
from pretrain.ckpt.load import load_method
from pretrain.eval.digit_classifier import classify, load_images, train_classifier
from pretrain.eval.frechet import frechet_distance
from pretrain.recipes import load_config
from pretrain.train import Trainer
from pretrain.visualize import image_grid

from machine import device_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "configs" / "dit_digits.toml"
IMAGE_SIZE = 16


def digits_shards(workdir: Path) -> Path:
    out = workdir / "digits16"
    if not (out / "manifest.json").is_file():
        write_shards(digits_samples(IMAGE_SIZE), out, shard_size=128, classes=DIGITS_CLASSES, image_size=IMAGE_SIZE)
    return out


def cached_classifier(shards: Path, workdir: Path, seed: int):
    """The scoring CNN, trained once per shard set and seed and cached in the work directory (not in git)."""
    sha = Manifest.load(shards).splits["train"][0].sha256[:12]
    cache = workdir / f"digit_classifier_{sha}_seed{seed}.pt"
    images, labels = load_images(str(shards), "train", IMAGE_SIZE)
    if cache.is_file():
        from pretrain.eval.digit_classifier import DigitClassifier

        model = DigitClassifier(1, 10, IMAGE_SIZE)
        model.load_state_dict(torch.load(cache, weights_only=True))
        return model.eval(), images, labels, 0.0
    start = time.perf_counter()
    model = train_classifier(images, labels, seed=seed)
    torch.save(model.state_dict(), cache)
    return model, images, labels, time.perf_counter() - start


def score(classifier, images: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor) -> dict[str, float]:
    predicted, features = classify(classifier, images)
    return {
        "class_accuracy": float((predicted == labels).float().mean()),
        "frechet_distance": frechet_distance(features, real_features),
    }


def generate(
    method, per_class: int, steps: int, scale: float, sampler: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.arange(10).repeat_interleave(per_class)
    generator = torch.Generator().manual_seed(seed)
    samples = method.generate(labels, steps, scale, sampler, generator)
    return samples.clamp(-1, 1), labels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2500, help="DiT training steps")
    parser.add_argument("--per-class", type=int, default=100, help="generated samples per class and setting")
    parser.add_argument("--sample-steps", type=int, default=25, help="ODE steps per sample")
    parser.add_argument(
        "--scales", default="1,1.5,2,3,5", help="guidance scales s of the DiT paper (1 = none), comma-separated"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep shards, run, classifier cache and grids here")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        shards = digits_shards(workdir)
        classifier, train_images, _, classifier_seconds = cached_classifier(shards, workdir, args.seed)
        _, real_features = classify(classifier, train_images)
        test_images, test_labels = load_images(str(shards), "test", IMAGE_SIZE)

        overrides = [
            f'data.shards="{shards}"',
            f'run.output_dir="{workdir / "runs"}"',
            f"run.seed={args.seed}",
            f"train.steps={args.steps}",
            "train.resume=none",
            f"optim.warmup_steps={min(100, args.steps // 10)}",
        ]
        cfg = load_config(CONFIG, overrides)
        train_start = time.perf_counter()
        result = Trainer(cfg).fit()
        train_seconds = time.perf_counter() - train_start

        rows = {"real test digits": score(classifier, test_images, test_labels, real_features)}
        untrained = load_method(result.checkpoint, random_init=True)[1]
        images, labels = generate(untrained, args.per_class, args.sample_steps, 1.0, "euler", args.seed)
        rows["untrained DiT, s=1"] = score(classifier, images, labels, real_features)
        trained = load_method(result.checkpoint)[1]
        sample_seconds = {}
        for scale in scales:
            for sampler in ("euler", "heun") if scale == 3 else ("euler",):
                start = time.perf_counter()
                images, labels = generate(trained, args.per_class, args.sample_steps, scale, sampler, args.seed)
                name = f"trained DiT (EMA), s={scale:g}, {sampler}"
                sample_seconds[name] = time.perf_counter() - start
                rows[name] = score(classifier, images, labels, real_features)
                grid = image_grid(trained.decode(images[:: max(1, args.per_class // 8)]), nrow=8)
                Image.fromarray(grid.numpy()).save(workdir / f"samples_s{scale:g}_{sampler}.png")

    device = device_info()
    report = {
        "benchmark": "dit_digits",
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([sys.executable, *sys.argv]),
        "parameters": {**{k: v for k, v in vars(args).items() if k not in ("workdir", "out")}, "config": cfg.to_dict()},
        "seconds": {
            "total": time.perf_counter() - started,
            "dit_training": train_seconds,
            "classifier_training": classifier_seconds,
            "sampling": sample_seconds,
        },
        "final_train_loss": result.losses[-1],
        "results": rows,
        "note": "Frechet distance: FID's formula on the 128-d features of a CNN trained on the 1,437 real training "
        "digits, against those training digits; accuracy: that CNN's labels for samples of each class. Samples: "
        f"{args.per_class} per class, {args.sample_steps} ODE steps (Heun: 2 model calls per step). Timings were "
        "measured on a 2-core VM shared with other jobs, so they are inflated.",
    }
    out = Path(args.out) / f"dit_digits_{device['type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"DiT digits: {args.steps} steps in {train_seconds:.0f}s, total {report['seconds']['total']:.0f}s")
    for name, row in rows.items():
        print(f"  {name:<36} accuracy {100 * row['class_accuracy']:6.2f}%   Frechet {row['frechet_distance']:8.2f}")
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
