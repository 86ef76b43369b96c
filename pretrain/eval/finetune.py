"""`pretrain eval finetune CKPT`: fine-tune a pretraining checkpoint's encoder end to end with a classification
head (pretrain/methods/finetune.py), then score the test split.

The fine-tune is a training run of its own: a run directory (resumable: the same command continues it), the
engines and launchers of any run, and an MLflow run in the pretraining run's store, tagged with the pretraining
run's id. Its final top-1 is logged on both runs (on the pretraining run as `finetune_top1`, or
`finetune_top1_10pct` for a label fraction).

The fine-tuning recipe is `--config`, else the one the pretraining config names (`eval.finetune_config`). The
encoder's settings come from the checkpoint: its `model` section and the data normalization (`data.mean`,
`data.std`) are copied into the recipe, which may set only the attention kernel of its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import read_meta
from pretrain.ckpt.load import load_method, pretrained_encoder
from pretrain.config import Config, ConfigError, apply_overrides, read_toml
from pretrain.data import build_eval_loader
from pretrain.distributed import destroy_distributed
from pretrain.engines.base import resolve_device
from pretrain.methods.finetune import data_classes
from pretrain.recipes import config_from_dict, config_from_saved
from pretrain.runtime.world import WorldInfo, world_from_env
from pretrain.tracking.local_record import read_run_file

log = logging.getLogger("pretrain.eval")


@torch.no_grad()
def classification_top1(cfg: Config, network: torch.nn.Module, shards: str, device: torch.device) -> tuple[float, int]:
    """(top-1, images) of a classifier on the test split (center crops, as kNN and the probe read it)."""
    network.eval()
    correct = total = 0
    for batch in build_eval_loader(cfg, shards, "test"):
        predicted = network(batch["image"].to(device)).argmax(dim=-1).cpu()
        correct += int((predicted == batch["label"]).sum())
        total += len(batch["label"])
    if not total:
        raise ValueError(f"no test images in {shards}")
    return correct / total, total


def percent_tag(fraction: float) -> str:
    """0.1 -> "10pct", 0.01 -> "1pct", 0.125 -> "12.5pct"."""
    return f"{100 * fraction:g}pct"


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
    tags = {
        "pretrained_checkpoint": str(path.resolve()),
        "pretrained_method": pre.method.name,
        "finetune_label_fraction": str(cfg.data.label_fraction),
        "finetune_init": "random" if random_init else "pretrained",
    }
    # The checkpoint may predate the run's creation on the server (tracking is asynchronous); run.json has it then.
    pre_run_id = meta.get("mlflow_run_id") or pre_tracking.get("run_id")
    if pre_run_id:
        tags["pretrained_run_id"] = pre_run_id
    return cfg, tags


def log_metric_best_effort(tracking_uri: str, run_id: str, key: str, value: float, step: int, timeout: float) -> bool:
    """Log one metric on an existing MLflow run from a daemon thread, waiting at most `timeout` seconds: an
    unreachable server never holds up or fails the command. True when it was logged."""
    done: dict[str, bool] = {}

    def send() -> None:
        try:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).log_metric(run_id, key, value, step=step)
            done["ok"] = True
        except Exception as exc:  # any failure of the store or network
            log.warning("tracking: could not log %s on run %s at %s: %s", key, run_id, tracking_uri, exc)

    thread = threading.Thread(target=send, name="finetune-metric", daemon=True)
    thread.start()
    thread.join(timeout)
    return done.get("ok", False)


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
        trainer = Trainer(cfg, tags=tags)
        result = trainer.fit()
        tracking_uri = trainer.tracker.tracking_uri
    finally:
        destroy_distributed()
    world = world_from_env()
    if not world.is_main:
        return {"rank": world.rank}
    _, method, path = load_method(result.checkpoint)
    device = resolve_device(cfg.run.device, WorldInfo())
    top1, images = classification_top1(cfg, method.inference_network().to(device), cfg.data.shards, device)
    fraction = cfg.data.label_fraction
    logged = []
    timeout = cfg.tracking.close_timeout
    if cfg.tracking.enabled and result.mlflow_run_id:
        if log_metric_best_effort(tracking_uri, result.mlflow_run_id, "finetune_top1", top1, result.step, timeout):
            logged.append(f"fine-tune run {result.mlflow_run_id}")
    pre_run = tags.get("pretrained_run_id")
    if cfg.tracking.enabled and pre_run and not random_init:
        pre_path = Path(tags["pretrained_checkpoint"])
        pre_uri = read_run_file(pre_path.parent.parent).get("tracking_uri") or tracking_uri
        key = "finetune_top1" if fraction == 1 else f"finetune_top1_{percent_tag(fraction)}"
        if log_metric_best_effort(pre_uri, pre_run, key, top1, read_meta(pre_path)["step"], timeout):
            logged.append(f"pretraining run {pre_run} as {key}")
    weights = (
        "random init" if random_init else f"{tags['pretrained_method']} checkpoint {tags['pretrained_checkpoint']}"
    )
    labels = "all labels" if fraction == 1 else f"{percent_tag(fraction)} of the labels"
    report = {
        "checkpoint": str(path),
        "pretrained": tags["pretrained_checkpoint"],
        "weights": "random init" if random_init else "pretrained",
        "finetune_top1": top1,
        "label_fraction": fraction,
        "steps": result.step,
        "num_test": images,
        "mlflow_run_id": result.mlflow_run_id,
        "logged_on": logged,
        "seconds": time.perf_counter() - started,
    }
    report["summary"] = (
        f"fine-tune top-1 {100 * top1:.2f}% ({images} test images; {result.step} steps on {labels} from "
        f"{weights}); run: {cfg.run_dir}"
    )
    return report
