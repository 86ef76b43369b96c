"""MAE, MoCo v3, DINO and the pretext tasks on real handwritten digits: each pretrains a ViT-tiny/4 on the CPU,
then its encoder is scored three ways against a random-init encoder of the same shape: weighted kNN and a linear
probe on frozen features, and end-to-end fine-tuning on 100% and 10% of the labels (`pretrain eval finetune`
with configs/finetune_vit_tiny_digits.toml; the random-init encoder is fine-tuned the same way).

    python benchmarks/ssl_digits.py                     # MAE, MoCo v3 and DINO
    python benchmarks/ssl_digits.py --methods jigsaw    # one pretext task (rotation, jigsaw, relative_patch, ...;
                                                        # colorization runs but is not benchmarked: the digits are gray)
    python benchmarks/ssl_digits.py --methods dino --steps 50
    python benchmarks/ssl_digits.py --methods cpc       # CPC v2 on a ResNet-18 (layer norm) over a patch grid
    python benchmarks/ssl_digits.py --methods dino,dinov2_distill   # DINOv2 distillation of the dino row's run
    python benchmarks/ssl_digits.py --methods mae --reuse --no-linear   # fine-tune an existing run's checkpoint

Each method runs its digits demo config (configs/*_digits.toml) unchanged apart from paths; the table and
a JSON record (device, versions, seconds per method) go to benchmarks/results/ssl_digits_cpu.json. Rows of
methods not run keep their earlier results, each with the command that produced it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from pretrain.checkpoint import find_checkpoint, read_meta
from pretrain.ckpt.load import pretrained_encoder
from pretrain.config import ConfigError
from pretrain.demo import ensure_digit_shards
from pretrain.eval.classify import percent_tag
from pretrain.eval.finetune import evaluate_finetune
from pretrain.eval.run import evaluate_knn, evaluate_linear
from pretrain.logs import setup_logging
from pretrain.methods.registry import teacher_checkpoint
from pretrain.recipes import load_config
from pretrain.train import train

from machine import device_info

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {
    "mae": ROOT / "configs" / "mae_vit_tiny_digits.toml",
    "moco": ROOT / "configs" / "moco_v3_vit_tiny_digits.toml",
    "dino": ROOT / "configs" / "dino_vit_tiny_digits.toml",
    "dinov2": ROOT / "configs" / "dinov2_vit_tiny_digits.toml",
    # Distills the dino row's finished run (run `--methods dino` first, or in the same command).
    "dinov2_distill": ROOT / "configs" / "dinov2_distill_vit_tiny_digits.toml",
    "simclr": ROOT / "configs" / "simclr_vit_tiny_digits.toml",
    "moco_v2": ROOT / "configs" / "moco_v2_vit_tiny_digits.toml",
    "cpc": ROOT / "configs" / "cpc_v2_resnet18_digits.toml",
    "rotation": ROOT / "configs" / "rotation_vit_tiny_digits.toml",
    "jigsaw": ROOT / "configs" / "jigsaw_vit_tiny_digits.toml",
    "relative_patch": ROOT / "configs" / "relative_patch_vit_tiny_digits.toml",
    "inpainting": ROOT / "configs" / "inpainting_vit_tiny_digits.toml",
    # Runnable, not run: the digits are gray (one ab bin), so colorization has nothing to learn on them.
    "colorization": ROOT / "configs" / "colorization_vit_tiny_digits.toml",
}
FINETUNE_CONFIG = ROOT / "configs" / "finetune_vit_tiny_digits.toml"
LABEL_FRACTIONS = (1.0, 0.1)
# A ResNet encoder (CPC) takes the recipe without its ViT-only parts.
RESNET_FINETUNE = [
    "method.finetune.fc_norm=false",
    "method.finetune.layer_decay=1.0",
    "method.finetune.drop_path=0.0",
]


def finished_checkpoint(out: Path, cfg) -> Path | None:
    """The run's checkpoint at its last step, if an earlier invocation left one (`--reuse`)."""
    try:
        path = find_checkpoint(out / cfg.run.name)
    except FileNotFoundError:
        return None
    return path if read_meta(path)["step"] == cfg.train.steps else None


def finetune_scores(checkpoint: Path, cfg, out: Path, shards: Path) -> dict | str:
    """Fine-tune top-1 at each label fraction, from the pretrained encoder and from its random init; or why the
    checkpoint has no encoder to fine-tune (CPC's patch-grid encoder, the split-brain pair)."""
    try:
        pretrained_encoder(checkpoint)
    except (
        ConfigError
    ) as exc:  # recorded in the JSON: the checkpoint's path relative to the workdir, not this machine's
        where = checkpoint.resolve()
        shown = f"<workdir>/{where.relative_to(out.resolve())}" if where.is_relative_to(out.resolve()) else where.name
        return str(exc).replace(str(where), shown).replace(str(checkpoint), shown)
    extra = RESNET_FINETUNE if cfg.model.arch != "vit" else []
    scores: dict[str, dict[str, float]] = {"pretrained": {}, "random_init": {}}
    for weights, random_init in (("pretrained", False), ("random_init", True)):
        for fraction in LABEL_FRACTIONS:
            overrides = [f'run.output_dir="{out / "finetune"}"', "train.resume=none", *extra]
            run_dir = out / "finetune" / f"{cfg.run.name}-finetune{'-random-init' if random_init else ''}"
            run_dir = run_dir.with_name(run_dir.name + (f"-{percent_tag(fraction)}" if fraction < 1 else ""))
            shutil.rmtree(run_dir, ignore_errors=True)  # a fresh fine-tune every time
            report = evaluate_finetune(
                checkpoint, FINETUNE_CONFIG, fraction, random_init, str(shards), overrides=overrides
            )
            scores[weights][percent_tag(fraction)] = report["finetune_top1"]
            print(report["summary"], flush=True)
    return scores


def run_method(name: str, out: Path, shards: Path, steps: int, reuse: bool, finetune: bool, frozen: bool) -> dict:
    """Pretrain (or, with `reuse`, take the finished run of an earlier invocation), then score: kNN and the linear
    probe when `frozen`, fine-tuning when `finetune`. Scores not computed are left out of the row."""
    overrides = [f'data.shards="{shards}"', f'run.output_dir="{out}"', "train.resume=none"]
    base = load_config(CONFIGS[name])
    if teacher := teacher_checkpoint(base):  # the workdir's run of that name (a row run before this one)
        overrides.append(f'method.{base.method.name}.teacher_checkpoint="{out / Path(teacher).name}"')
    if steps:
        overrides += [f"train.steps={steps}", f"optim.warmup_steps={min(steps, base.optim.warmup_steps)}"]
    cfg = load_config(CONFIGS[name], overrides)
    checkpoint = finished_checkpoint(out, cfg) if reuse else None
    row: dict = {"config": str(CONFIGS[name].relative_to(ROOT))}
    if teacher:
        row["teacher"] = f"<workdir>/{Path(teacher).name}"
    if checkpoint is None:
        started = time.perf_counter()
        result = train(cfg)
        checkpoint = result.checkpoint
        row.update(
            train_seconds=round(time.perf_counter() - started, 1),
            final_loss=result.losses[-1] if result.losses else None,
            mlflow_run_id=result.mlflow_run_id,
        )
    row.update(steps=read_meta(checkpoint)["step"], global_batch=cfg.data.batch_size * cfg.optim.accum_steps)
    for weights, random_init in (("pretrained", False), ("random_init", True)):
        row[weights] = {}
        if frozen:
            row[weights]["knn_top1"] = evaluate_knn(checkpoint, random_init=random_init)["knn_top1"]
            row[weights]["linear_top1"] = evaluate_linear(checkpoint, random_init=random_init)["linear_top1"]
    if finetune:
        started = time.perf_counter()
        scores = finetune_scores(checkpoint, cfg, out, shards)
        if isinstance(scores, str):
            row["finetune_not_applicable"] = scores
        for weights, top1 in scores.items() if isinstance(scores, dict) else ():
            row[weights]["finetune_top1"] = top1
        row["finetune_seconds"] = round(time.perf_counter() - started, 1)
        row["finetune_config"] = str(FINETUNE_CONFIG.relative_to(ROOT))
    return row


def merge_rows(old: dict, new: dict) -> dict:
    """A method's new row over its old one: scores measured now replace theirs, the others are kept."""
    merged = {**old, **new}
    for weights in ("pretrained", "random_init"):
        merged[weights] = {**old.get(weights, {}), **new.get(weights, {})}
    return merged


def _pair(row: dict, *path: str) -> str:
    """ "pretrained / random init" of the score at `path`, or "not run"."""
    values = []
    for weights in ("pretrained", "random_init"):
        node = row.get(weights, {})
        for key in path:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        values.append(f"{100 * node:.2f}%" if isinstance(node, float) else None)
    if all(values):
        return " / ".join(values)
    return "n/a" if path[0] == "finetune_top1" and "finetune_not_applicable" in row else "not run"


def table(results: dict[str, dict]) -> str:
    lines = [
        "| method | steps | train time | kNN top-1 | linear probe top-1 | fine-tune top-1, 100% labels "
        "| fine-tune top-1, 10% labels |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        seconds = f"{r['train_seconds']:.0f} s" if "train_seconds" in r else "-"
        lines.append(
            f"| {name} | {r['steps']} | {seconds} | {_pair(r, 'knn_top1')} | {_pair(r, 'linear_top1')} | "
            f"{_pair(r, 'finetune_top1', '100pct')} | {_pair(r, 'finetune_top1', '10pct')} |"
        )
    return "\n".join(lines) + "\n(each cell: pretrained / random init)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="mae,moco,dino", help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--steps", type=int, default=0, help="override every method's train.steps (0: the config's)")
    parser.add_argument("--workdir", default="runs/ssl_digits", help="shards, runs and MLflow stores")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the JSON result")
    parser.add_argument(
        "--reuse", action="store_true", help="score a finished run left in --workdir instead of pretraining again"
    )
    parser.add_argument(
        "--no-finetune", dest="finetune", action="store_false", help="skip the fine-tune columns (4 runs a method)"
    )
    parser.add_argument(
        "--no-frozen", dest="frozen", action="store_false", help="skip kNN and the linear probe (keep earlier ones)"
    )
    args = parser.parse_args()
    setup_logging()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(CONFIGS)}")

    workdir = Path(args.workdir).resolve()
    image_size = load_config(CONFIGS["mae"]).data.image_size
    shards = ensure_digit_shards(workdir / "digits-shards", image_size)
    script = Path(sys.argv[0]).resolve()  # recorded relative to the repository root, without this machine's python
    command = " ".join(
        ["python", str(script.relative_to(ROOT) if script.is_relative_to(ROOT) else script), *sys.argv[1:]]
    )
    date = datetime.now(UTC).isoformat(timespec="seconds")
    # A row's scores each come from the latest command that measured them: pretraining and the frozen scores
    # from "command", the fine-tune columns from "finetune_command".
    results = {}
    for name in methods:
        row = run_method(name, workdir, shards, args.steps, args.reuse, args.finetune, args.frozen)
        if args.frozen or "train_seconds" in row:
            row["command"] = command
        if args.finetune:
            row["finetune_command"] = command
        results[name] = row

    device = device_info()
    out = Path(args.out) / f"ssl_digits_{device['type']}.json"
    if out.is_file():  # rows and scores not measured this time are kept, each row with its latest command
        old = json.loads(out.read_text()).get("results", {})
        results = {**old, **{name: merge_rows(old.get(name, {}), row) for name, row in results.items()}}
    record = {
        "benchmark": "ssl_digits",
        "device": device,
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "date": date,
        "command": command,
        "data": "scikit-learn load_digits: 1,437 train / 360 test images, upsampled to 32 px",
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(table(results))
    print(f"-> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
