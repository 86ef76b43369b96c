"""`pretrain eval finetune CKPT`: fine-tune a pretraining checkpoint's encoder end to end with a classification
head (pretrain/methods/finetune.py), then score the test split.

The fine-tune is a training run of its own: a run directory (resumable: the same command continues it), the
engines and launchers of any run, and an MLflow run in the pretraining run's store, tagged with the pretraining
run's id. Its final top-1 is logged on both runs (on the pretraining run as `finetune_top1`, or
`finetune_top1_10pct` for a label fraction); the loop does both, so `pretrain train` and the launchers on a
fine-tuning config get the same.

The fine-tuning recipe is `--config`, else the one the pretraining config names (`eval.finetune_config`). The
encoder's settings come from the checkpoint: its `model` section and the data normalization (`data.mean`,
`data.std`) are copied into the recipe, which may set only the attention kernel of its own.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from pretrain.checkpoint import read_meta
from pretrain.ckpt.load import pretrained_encoder, pretraining_run
from pretrain.config import Config, ConfigError, apply_overrides, read_toml
from pretrain.distributed import destroy_distributed
from pretrain.eval.classify import percent_tag
from pretrain.methods.finetune import data_classes
from pretrain.recipes import config_from_dict, config_from_saved
from pretrain.runtime.world import world_from_env
from pretrain.tracking.local_record import read_run_file

log = logging.getLogger("pretrain.eval")


def finetune_config(
    checkpoint: str | Path,
    config: str | Path | None = None,
    label_fraction: float | None = None,
    random_init: bool = False,
    shards: str = "",
    overrides: list[str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """(the fine-tuning run's config, the tags linking it to the pretraining run)."""
    path = pretrained_encoder(checkpoint).path  # a ViT or ResNet encoder, also for --random-init's shape
    meta = read_meta(path)
    pre = config_from_saved(meta["config"])
    recipe = config or pre.eval.finetune_config
    if not recipe:
        raise ConfigError(
            f"eval.finetune_config: the config of {path} names no fine-tuning recipe; pass --config, e.g. "
            "configs/finetune_vit_b16.toml"
        )
    raw = read_toml(recipe)
    own_model = raw.get("model", {})
    saved_model = pre.to_dict()["model"]
    for key, value in own_model.items():
        if key != "attn_backend" and saved_model.get(key) != value:
            raise ConfigError(
                f"model.{key}: {recipe} sets {value!r}, the encoder of {path} has {saved_model.get(key)!r}; the "
                "model section comes from the checkpoint (a recipe may set model.attn_backend only)"
            )
    raw["model"] = {**saved_model, **{k: v for k, v in own_model.items() if k == "attn_backend"}}
    data = raw.setdefault("data", {})
    data["mean"], data["std"] = list(pre.data.mean), list(pre.data.std)
    data["shards"] = shards or data.get("shards") or pre.eval.shards or pre.data.shards
    if label_fraction is not None:
        data["label_fraction"] = label_fraction
    fraction = data.get("label_fraction", 1.0)
    method = raw.setdefault("method", {})
    method["name"] = "finetune"
    ft = method.setdefault("finetune", {})
    ft["checkpoint"] = "" if random_init else str(path.resolve())
    if not ft.get("num_classes"):
        classes = data_classes(data["shards"])
        if classes is None:
            raise ConfigError(
                f"method.finetune.num_classes: {data['shards']} has no manifest naming its classes; set it"
            )
        ft["num_classes"] = classes
    run = raw.setdefault("run", {})
    suffix = ("-random-init" if random_init else "") + (
        f"-{percent_tag(fraction)}" if isinstance(fraction, (int, float)) and fraction < 1 else ""
    )
    run["name"] = f"{pre.run.name}-finetune{suffix}"
    pre_run_dir = path.parent.parent  # <run>/checkpoints/step_N
    tracking = raw.setdefault("tracking", {})
    pre_tracking = read_run_file(pre_run_dir)
    if not tracking.get("uri") and not os.environ.get("MLFLOW_TRACKING_URI") and pre_tracking.get("tracking_uri"):
        tracking["uri"] = pre_tracking["tracking_uri"]  # one store holds both runs, so the link can be followed
    tracking.setdefault("experiment", pre.tracking.experiment)
    cfg = config_from_dict(apply_overrides(raw, overrides or []))
    # The Trainer links a fine-tune to its encoder's run; a random-init baseline names the run it takes its shape from.
    tags = {
        **pretraining_run(path).tags(),
        "finetune_label_fraction": str(cfg.data.label_fraction),
        "finetune_init": "random" if random_init else "pretrained",
    }
    return cfg, tags


def evaluate_finetune(
    checkpoint: str | Path,
    config: str | Path | None = None,
    label_fraction: float | None = None,
    random_init: bool = False,
    shards: str = "",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Fine-tune (or continue an interrupted fine-tune), then score the final network on the test split. Every
    rank trains; rank 0 scores and reports (other ranks return {"rank": r})."""
    from pretrain.train import Trainer  # the loop imports the evaluations

    started = time.perf_counter()
    cfg, tags = finetune_config(checkpoint, config, label_fraction, random_init, shards, overrides)
    try:
        result = Trainer(cfg, tags=tags).fit()
    finally:
        destroy_distributed()
    world = world_from_env()
    if not world.is_main:
        return {"rank": world.rank}
    if result.test_top1 is None:
        raise RuntimeError(f"the fine-tune stopped at step {result.step} of {cfg.train.steps} ({result.stopped_by})")
    fraction = cfg.data.label_fraction
    weights = (
        "random init" if random_init else f"{tags['pretrained_method']} checkpoint {tags['pretrained_checkpoint']}"
    )
    labels = "all labels" if fraction == 1 else f"{percent_tag(fraction)} of the labels"
    report = {
        "checkpoint": str(result.checkpoint),
        "pretrained": tags["pretrained_checkpoint"],
        "weights": "random init" if random_init else "pretrained",
        "finetune_top1": result.test_top1,
        "label_fraction": fraction,
        "steps": result.step,
        "num_test": result.test_images,
        "mlflow_run_id": result.mlflow_run_id,
        "seconds": time.perf_counter() - started,
    }
    report["summary"] = (
        f"fine-tune top-1 {100 * result.test_top1:.2f}% ({result.test_images} test images; {result.step} steps on "
        f"{labels} from {weights}); run: {cfg.run_dir}"
    )
    return report
