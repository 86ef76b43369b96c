"""The generative models on real digits, on CPU, scored alike: the autoregressive ones, the GANs and the DiT of

- PixelCNN (configs/pixelcnn_digits.toml): test negative log-likelihood in bits per dimension against the
  uniform model's 8, and its samples scored like the DiT's;
- the VQ tokenizer (configs/vq_digits.toml): reconstruction error of the test digits through their tokens,
  codebook usage and perplexity, and the reconstructions scored like samples (the ceiling of what a model of
  its tokens can reach);
- the token transformer (configs/gpt_digits.toml) on the tokenizer's token shards: test bits per token,
  samples at guidance scales s = 1 (none), 1.5, 2, 3, and sampling time with and without the KV cache (the
  tokens are checked equal);
- the GANs (configs/dcgan_digits.toml, configs/stylegan_digits.toml): samples of the EMA generator, StyleGAN's
  also with truncation psi 0.7, and latent interpolations saved as pictures;
- diffusion distillation of the DiT below: its guidance student (configs/dit_guidance_digits.toml), progressive
  rounds from it down to one step (configs/dit_progressive_digits.toml) and a consistency student
  (configs/dit_consistency_digits.toml), at 1, 2 and 4 steps with and without guidance, next to the teacher at
  50 steps, with the sampling wall time of each.

Samples are scored as in dit_digits.py by a small CNN trained on the real training digits: the fraction of
class-c samples it calls c, and the Frechet distance of its 128-d features to the real training digits. The
pixel-space DiT of dit_digits.py is trained and scored in the same run, by the same classifier, at the same
guidance scales.

    OMP_NUM_THREADS=1 python benchmarks/generative_digits.py --workdir runs/generative_digits   # ~45 min, 2 cores
    python benchmarks/generative_digits.py --pixelcnn-steps 50 --vq-steps 50 --gpt-steps 50 --dit-steps 50 \
        --dcgan-steps 50 --stylegan-steps 50 --guidance-steps 20 --progressive-steps 10 --progressive-from 4 \
        --consistency-steps 20 --per-class 5  # a smoke run

(with the project installed, `pip install -e .`, or PYTHONPATH set to the repository root)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from dit_digits import IMAGE_SIZE, cached_classifier, digits_shards, score
from dit_digits import generate as generate_dit
from PIL import Image

from pretrain.ckpt.load import load_method
from pretrain.eval.digit_classifier import classify, load_images
from pretrain.eval.nll import evaluate_nll
from pretrain.methods.vq import load_tokenizer
from pretrain.recipes import load_config
from pretrain.token_shards import code_statistics, write_token_shards
from pretrain.train import Trainer
from pretrain.visualize import image_grid

from machine import device_info

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CONFIGS = REPO / "configs"


def train(config: str, workdir: Path, steps: int, *extra: str) -> tuple[Path, float, float]:
    """(checkpoint, seconds, final loss) of a digits demo config, trained from scratch in the work directory."""
    overrides = [
        f'run.output_dir="{workdir / "runs"}"',
        f"train.steps={steps}",
        "train.resume=none",
        "tracking.enabled=false",
        *extra,
    ]
    cfg = load_config(CONFIGS / config, [*overrides, f"optim.warmup_steps={min(100, steps // 10)}"])
    start = time.perf_counter()
    result = Trainer(cfg).fit()
    return result.checkpoint, time.perf_counter() - start, result.losses[-1]


def save_grid(images: torch.Tensor, per_class: int, path: Path) -> None:
    """Up to 8 samples of each class, one row per class, from images ordered class by class in [-1, 1]."""
    keep = min(per_class, 8)
    rows = images.view(10, per_class, *images.shape[1:])[:, :keep].flatten(0, 1)
    Image.fromarray(image_grid((rows.clamp(-1, 1) + 1) / 2, nrow=keep).numpy()).save(path)


def pixelcnn_rows(args, workdir: Path, shards: Path, classifier, real_features) -> tuple[dict, dict]:
    checkpoint, seconds, loss = train("pixelcnn_digits.toml", workdir, args.pixelcnn_steps, f'data.shards="{shards}"')
    nll = evaluate_nll(checkpoint, split="test")
    _, method, _ = load_method(checkpoint)
    per_class = args.pixelcnn_per_class
    labels = torch.arange(10).repeat_interleave(per_class)
    start = time.perf_counter()
    samples = method.generate(labels, len(labels), torch.Generator().manual_seed(args.seed))
    sample_seconds = time.perf_counter() - start
    images = samples.float() / 127.5 - 1
    save_grid(images, per_class, workdir / "pixelcnn_samples.png")
    row = {
        "test_bits_per_dim": nll["bits_per_dim"],
        "uniform_bits_per_dim": 8.0,
        "samples_per_class": per_class,
        **score(classifier, images, labels, real_features),
    }
    timing = {"training": seconds, "final_train_loss": loss, "sampling": sample_seconds}
    return {"PixelCNN": row}, timing


def tokenizer_rows(args, workdir: Path, shards: Path, classifier, real_features) -> tuple[dict, dict, Path, Path]:
    checkpoint, seconds, loss = train("vq_digits.toml", workdir, args.vq_steps, f'data.shards="{shards}"')
    tokenizer = load_tokenizer(checkpoint)
    test_images, test_labels = load_images(str(shards), "test", IMAGE_SIZE)
    with torch.no_grad():
        _, indices, _, _ = tokenizer.encode(test_images)
        recon = tokenizer.decode_indices(indices).clamp(-1, 1)
    mse = float(((recon - test_images) / 2).pow(2).mean())  # in [0, 1] pixel units
    codes = code_statistics(torch.bincount(indices.flatten(), minlength=tokenizer.quantizer.num_codes))
    row = {
        "l1": float(((recon - test_images) / 2).abs().mean()),
        "mse": mse,
        "psnr_db": 10 * math.log10(1 / mse),
        "num_codes": tokenizer.quantizer.num_codes,
        "tokens_per_image": indices[0].numel(),
        "codebook_usage": codes["usage"],
        "codebook_perplexity": codes["perplexity"],
        **score(classifier, recon, test_labels, real_features),
    }
    order = test_labels.argsort(stable=True)
    pairs = torch.stack([test_images[order][::36][:10], recon[order][::36][:10]])
    grid = image_grid((pairs.flatten(0, 1) + 1) / 2, nrow=10)
    Image.fromarray(grid.numpy()).save(workdir / "vq_reconstructions.png")
    tokens = workdir / "digits16_tokens"
    start = time.perf_counter()
    write_token_shards(
        tokenizer, shards, tokens, tokenizer_name="the benchmark's vq_digits", shard_size=128, overwrite=True
    )
    timing = {"training": seconds, "final_train_loss": loss, "tokenizing": time.perf_counter() - start}
    return {"VQ tokenizer, test reconstructions": row}, timing, checkpoint.parent.parent, tokens


def gpt_rows(args, workdir: Path, tokenizer: Path, tokens: Path, classifier, real_features) -> tuple[dict, dict]:
    checkpoint, seconds, loss = train(
        "gpt_digits.toml", workdir, args.gpt_steps, f'data.shards="{tokens}"', f'method.gpt.tokenizer="{tokenizer}"'
    )
    _, method, _ = load_method(checkpoint)
    bits = evaluate_nll(checkpoint, split="test")["bits_per_token"]  # with the true labels
    labels = torch.arange(10).repeat_interleave(args.per_class)
    rows, sampling = {}, {}
    for scale in args.scales:
        start = time.perf_counter()
        grids = method.generate(labels, torch.Generator().manual_seed(args.seed), cfg_scale=scale)
        sampling[f"s={scale:g}, KV cache"] = time.perf_counter() - start
        images = method.decode(grids) * 2 - 1
        rows[f"token transformer, s={scale:g}"] = {
            "test_bits_per_token": bits,
            "uniform_bits_per_token": math.log2(method.model.vocab_size),
            **score(classifier, images, labels, real_features),
        }
        save_grid(images, args.per_class, workdir / f"gpt_samples_s{scale:g}.png")
        if scale == 1.0:
            start = time.perf_counter()
            again = method.generate(labels, torch.Generator().manual_seed(args.seed), cfg_scale=scale, use_cache=False)
            sampling["s=1, no cache (whole prefix per token)"] = time.perf_counter() - start
            if not torch.equal(grids, again):
                raise AssertionError("cached and uncached sampling drew different tokens")
    timing = {"training": seconds, "final_train_loss": loss, "sampling": sampling}
    return rows, timing


def gan_rows(args, arch: str, workdir: Path, shards: Path, classifier, real_features) -> tuple[dict, dict]:
    """A GAN demo config trained here; samples of its EMA generator (StyleGAN: also with truncation 0.7)."""
    steps = args.dcgan_steps if arch == "dcgan" else args.stylegan_steps
    checkpoint, seconds, loss = train(f"{arch}_digits.toml", workdir, steps, f'data.shards="{shards}"')
    _, method, _ = load_method(checkpoint)
    labels = torch.arange(10).repeat_interleave(args.per_class)
    name = "DCGAN" if arch == "dcgan" else "StyleGAN"
    rows, sampling = {}, {}
    for psi in (1.0, 0.7) if arch == "stylegan" else (1.0,):
        start = time.perf_counter()
        images = method.generate(labels, len(labels), torch.Generator().manual_seed(args.seed), truncation_psi=psi)
        sampling[f"psi={psi:g}"] = time.perf_counter() - start
        key = f"{name} (EMA generator)" + (f", truncation psi={psi:g}" if arch == "stylegan" else "")
        rows[key] = score(classifier, images, labels, real_features)
        save_grid(images, args.per_class, workdir / f"{arch}_samples_psi{psi:g}.png")
    walks = method.interpolations(4, 8, torch.Generator().manual_seed(args.seed))
    Image.fromarray(image_grid((walks + 1) / 2, nrow=8).numpy()).save(workdir / f"{arch}_interpolations.png")
    return rows, {"training": seconds, "final_train_loss": loss, "sampling": sampling}


def dit_rows(args, workdir: Path, shards: Path, classifier, real_features) -> tuple[dict, dict, Path]:
    """The pixel-space DiT of dit_digits.py, trained and scored here with the same classifier, at the same
    guidance scales (Euler, --dit-sample-steps steps); its checkpoint is the distillations' teacher."""
    checkpoint, seconds, loss = train("dit_digits.toml", workdir, args.dit_steps, f'data.shards="{shards}"')
    _, method, _ = load_method(checkpoint)
    rows, sampling = {}, {}
    for scale in args.scales:
        start = time.perf_counter()
        images, labels = generate_dit(method, args.per_class, args.dit_sample_steps, scale, "euler", args.seed)
        sampling[f"s={scale:g}"] = time.perf_counter() - start
        rows[f"DiT (EMA), s={scale:g}, euler {args.dit_sample_steps} steps"] = score(
            classifier, images, labels, real_features
        )
    return rows, {"training": seconds, "final_train_loss": loss, "sampling": sampling}, checkpoint


def sampled_rows(name: str, checkpoint: Path, steps: list[int], args, classifier, real_features) -> tuple[dict, dict]:
    """Rows of a DiT or a distilled student's EMA samples at each step count and at s = 1 and --distill-scale, with
    their sampling wall time (--per-class samples of every class, one batch)."""
    _, method, _ = load_method(checkpoint)
    rows, sampling = {}, {}
    for count in steps:
        for scale in (1.0, args.distill_scale):
            start = time.perf_counter()
            images, labels = generate_dit(method, args.per_class, count, scale, "euler", args.seed)
            key = f"{name}, s={scale:g}, {count} step{'s' if count > 1 else ''}"
            sampling[key] = time.perf_counter() - start
            rows[key] = score(classifier, images, labels, real_features)
    return rows, sampling


def distill_rows(args, workdir: Path, shards: Path, teacher: Path, classifier, real_features) -> tuple[dict, dict]:
    """The DiT teacher at 50 steps; its guidance student (dit_guidance_digits); from that, progressive rounds down
    to one step (dit_progressive_digits) and a consistency student (dit_consistency_digits); every student
    sampled at s = 1 (no guidance) and at --distill-scale."""
    data = f'data.shards="{shards}"'
    rows, timing = {}, {}
    found, timing["teacher_sampling"] = sampled_rows(
        "DiT teacher (guided by the doubled batch)",
        teacher,
        [args.teacher_sample_steps],
        args,
        classifier,
        real_features,
    )
    rows |= found
    guidance, seconds, loss = train(
        "dit_guidance_digits.toml",
        workdir,
        args.guidance_steps,
        data,
        f'method.dit_distill.teacher_checkpoint="{teacher}"',
    )
    timing["guidance"] = {"training": seconds, "final_train_loss": loss}
    found, timing["guidance"]["sampling"] = sampled_rows(
        "guidance student", guidance, [args.teacher_sample_steps], args, classifier, real_features
    )
    rows |= found
    previous, steps, rounds = guidance, args.progressive_from, []
    while steps >= 1:
        checkpoint, seconds, loss = train(
            "dit_progressive_digits.toml",
            workdir,
            args.progressive_steps,
            data,
            f"run.name=dit_progressive_digits_{steps}",
            f"method.dit_distill.student_steps={steps}",
            f'method.dit_distill.teacher_checkpoint="{previous}"',
        )
        rounds.append({"student_steps": steps, "training": seconds, "final_train_loss": loss})
        if steps in (4, 2, 1):
            found, rounds[-1]["sampling"] = sampled_rows(
                "progressive student", checkpoint, [steps], args, classifier, real_features
            )
            rows |= found
        previous, steps = checkpoint, steps // 2
    timing["progressive_rounds"] = rounds
    consistency, seconds, loss = train(
        "dit_consistency_digits.toml",
        workdir,
        args.consistency_steps,
        data,
        f'method.dit_distill.teacher_checkpoint="{guidance}"',
    )
    timing["consistency"] = {"training": seconds, "final_train_loss": loss}
    found, timing["consistency"]["sampling"] = sampled_rows(
        "consistency student", consistency, [1, 2, 4], args, classifier, real_features
    )
    rows |= found
    return rows, timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pixelcnn-steps", type=int, default=1500)
    parser.add_argument("--vq-steps", type=int, default=1000)
    parser.add_argument("--gpt-steps", type=int, default=700)
    parser.add_argument("--dcgan-steps", type=int, default=750, help="DCGAN training steps; 0: no DCGAN row")
    parser.add_argument("--stylegan-steps", type=int, default=800, help="StyleGAN training steps; 0: no row")
    parser.add_argument("--dit-steps", type=int, default=2500, help="DiT training steps; 0: no DiT rows")
    parser.add_argument("--dit-sample-steps", type=int, default=25, help="the DiT's Euler steps per sample")
    parser.add_argument("--guidance-steps", type=int, default=600, help="guidance student; 0: no distillation rows")
    parser.add_argument("--progressive-steps", type=int, default=300, help="training steps of each progressive round")
    parser.add_argument(
        "--progressive-from", type=int, default=16, help="the first round's student steps (a power of 2)"
    )
    parser.add_argument("--consistency-steps", type=int, default=1000)
    parser.add_argument(
        "--teacher-sample-steps", type=int, default=50, help="the teacher's and guidance student's steps"
    )
    parser.add_argument(
        "--distill-scale", type=float, default=1.5, help="the guided rows' scale s of the distillations"
    )
    parser.add_argument(
        "--per-class", type=int, default=100, help="transformer, GAN and DiT samples per class and setting"
    )
    parser.add_argument("--pixelcnn-per-class", type=int, default=20, help="PixelCNN samples per class (slow)")
    parser.add_argument("--scales", default="1,1.5,2,3", help="guidance scales s (1 = none), comma-separated")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="keep shards, runs, classifier cache and grids here")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    args = parser.parse_args()
    args.scales = [float(s) for s in args.scales.split(",")]
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        shards = digits_shards(workdir)
        classifier, train_images, _, classifier_seconds = cached_classifier(shards, workdir, args.seed)
        _, real_features = classify(classifier, train_images)
        test_images, test_labels = load_images(str(shards), "test", IMAGE_SIZE)
        rows = {"real test digits": score(classifier, test_images, test_labels, real_features)}
        seconds: dict = {"classifier_training": classifier_seconds}
        found, seconds["pixelcnn"] = pixelcnn_rows(args, workdir, shards, classifier, real_features)
        rows |= found
        found, seconds["vq"], tokenizer, tokens = tokenizer_rows(args, workdir, shards, classifier, real_features)
        rows |= found
        found, seconds["gpt"] = gpt_rows(args, workdir, tokenizer, tokens, classifier, real_features)
        rows |= found
        for arch in ("dcgan", "stylegan"):
            if getattr(args, f"{arch}_steps"):
                found, seconds[arch] = gan_rows(args, arch, workdir, shards, classifier, real_features)
                rows |= found
        if args.dit_steps:
            found, seconds["dit"], teacher = dit_rows(args, workdir, shards, classifier, real_features)
            rows |= found
            if args.guidance_steps:
                found, seconds["distillation"] = distill_rows(args, workdir, shards, teacher, classifier, real_features)
                rows |= found

    device = device_info()
    command = " ".join(["python", str(Path(sys.argv[0]).resolve().relative_to(REPO)), *sys.argv[1:]])
    report = {
        "benchmark": "generative_digits",
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "torch_threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": command,
        "parameters": {k: v for k, v in vars(args).items() if k not in ("workdir", "out")},
        "seconds": {"total": time.perf_counter() - started, **seconds},
        "results": rows,
        "note": "Frechet distance: FID's formula on the 128-d features of a CNN trained on the 1,437 real training "
        "digits, against those training digits; accuracy: that CNN's labels for samples of each class. The VQ row "
        "scores the test digits passed through their tokens. Bits per token are of the 64-code tokens, not "
        "comparable with PixelCNN's bits per pixel value. The DiT is configs/dit_digits.toml as benchmarks/dit_digits.py "
        "trains it, scored here by the same classifier; it is the distillations' teacher. Distilled students take "
        "the guidance scale as an input (one forward per step at any s); the teacher guides by the doubled batch. Timings were measured on a 2-core VM shared with other jobs.",
    }
    out = Path(args.out) / f"generative_digits_{device['type']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"generative digits: total {report['seconds']['total']:.0f}s")
    for name, row in rows.items():
        extra = ""
        if "test_bits_per_dim" in row:
            extra = f"   {row['test_bits_per_dim']:.3f} bits/dim"
        elif "test_bits_per_token" in row:
            extra = f"   {row['test_bits_per_token']:.3f} bits/token"
        elif "psnr_db" in row:
            extra = f"   PSNR {row['psnr_db']:.2f} dB, {100 * row['codebook_usage']:.0f}% of codes"
        print(
            f"  {name:<44} accuracy {100 * row['class_accuracy']:6.2f}%   Frechet {row['frechet_distance']:8.2f}{extra}"
        )
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
