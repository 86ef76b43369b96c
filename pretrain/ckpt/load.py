"""Rebuild the method a checkpoint was trained with, for evaluation, sampling, export and conversion."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pretrain.checkpoint import dcp_load, find_checkpoint, read_meta
from pretrain.config import Config, ConfigError, apply_overrides
from pretrain.methods.base import Method
from pretrain.methods.registry import build_method, check_teacher
from pretrain.models.resnet import ResNet
from pretrain.models.vit import VisionTransformer
from pretrain.recipes import config_from_saved
from pretrain.rng import seed_everything
from pretrain.tracking.local_record import read_run_file


def load_method(
    checkpoint: str | Path, random_init: bool = False, overrides: list[str] | None = None
) -> tuple[Config, Method, Path]:
    """The method of a (DCP) checkpoint with its trained weights, unless `random_init`.

    A random network uses the run's seed, so it is exactly the network the run started from.
    """
    path = find_checkpoint(checkpoint)
    cfg = config_from_saved(apply_overrides(read_meta(path)["config"], overrides or []))
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    if not random_init:
        dcp_load({"model": method.state_dict()}, path)  # fills the live parameters in place
    return cfg, method.eval(), path


@dataclass
class PretrainedEncoder:
    """What a checkpoint's encoder is, read from meta.json and a copy of its method built on the meta device (no
    memory, no weights, the caller's RNG untouched)."""

    path: Path
    cfg: Config  # the pretraining run's
    prefix: str  # the encoder's name in its method's state dict
    kind: type  # VisionTransformer or ResNet
    shapes: dict[str, torch.Tensor]  # the encoder's tensors on the meta device, under the encoder's own names


def _saved_run(checkpoint: str | Path, key: str) -> tuple[Path, Config]:
    """(the DCP checkpoint `checkpoint` names, its run's config); `key` is the setting that named it."""
    try:
        path = find_checkpoint(checkpoint)
    except FileNotFoundError as exc:
        raise ConfigError(f"{key}: {exc}") from exc
    meta = read_meta(path)
    if meta.get("format", "dcp") != "dcp":
        raise ConfigError(
            f"{key}: {path} is a {meta.get('format')} checkpoint; `pretrain ckpt convert --to dcp` it first"
        )
    return path, config_from_saved(meta["config"])


def _meta_method(path: Path, cfg: Config, key: str) -> Method:
    """The method of a checkpoint's run built on the meta device: its names and shapes, no memory, no
    weights, the caller's RNG untouched."""
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            return build_method(cfg)
    except Exception as exc:  # a method that cannot be built without its files (a DiT's VAE)
        raise ConfigError(f"{key}: cannot rebuild the {cfg.method.name!r} method of {path} ({exc})") from exc


def pretrained_encoder(checkpoint: str | Path) -> PretrainedEncoder:
    """The encoder of a DCP checkpoint: its method's inference network (MAE's encoder, DINO's teacher, MoCo's
    query encoder), which must be a ViT or a ResNet for a classification head to attach to."""
    path, cfg = _saved_run(checkpoint, "method.finetune.checkpoint")
    method = _meta_method(path, cfg, "method.finetune.checkpoint")
    network = method.inference_network()
    if not isinstance(network, (VisionTransformer, ResNet)):
        raise ConfigError(
            f"method.finetune.checkpoint: {path} is a {cfg.method.name!r} checkpoint whose trained network is a "
            f"{type(network).__name__}, not a ViT or ResNet encoder that a classification head can attach to"
        )
    prefix = next(name for name, module in method.named_modules() if module is network)
    return PretrainedEncoder(path, cfg, prefix, type(network), network.state_dict())


@dataclass
class PretrainedTeacher:
    """A distillation's teacher checkpoint, checked against the run's config (meta.json only, no weights)."""

    path: Path
    cfg: Config  # the teacher's run's


def check_teacher_checkpoint(checkpoint: str | Path, cfg: Config) -> PretrainedTeacher:
    """Before any work: `checkpoint` exists, is DCP, and its run is a teacher the method of `cfg` takes."""
    path, saved = _saved_run(checkpoint, f"method.{cfg.method.name}.teacher_checkpoint")
    check_teacher(cfg, saved)
    return PretrainedTeacher(path, saved)


def load_teacher_state(teacher: PretrainedTeacher, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The teacher checkpoint's tensors whose names (in its own method's state dict) start with `prefixes`,
    read alone (a sharded checkpoint's other networks and optimizer state stay on disk)."""
    shapes = _meta_method(teacher.path, teacher.cfg, "teacher_checkpoint").state_dict()
    state = {n: torch.empty(t.shape, dtype=t.dtype) for n, t in shapes.items() if n.startswith(prefixes)}
    dcp_load({"model": state}, teacher.path)
    return state


def load_encoder_state(checkpoint: str | Path | PretrainedEncoder) -> tuple[Config, dict[str, torch.Tensor], Path]:
    """(the checkpoint's config, its encoder's weights under the encoder's own names, the checkpoint path): what
    fine-tuning attaches a head to, read alone from the DCP checkpoint (or the one `pretrained_encoder` found)."""
    encoder = checkpoint if isinstance(checkpoint, PretrainedEncoder) else pretrained_encoder(checkpoint)
    state = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in encoder.shapes.items()}
    dcp_load({"model": {f"{encoder.prefix}.{name}": tensor for name, tensor in state.items()}}, encoder.path)
    return encoder.cfg, state, encoder.path


def check_encoder_checkpoint(checkpoint: str | Path, cfg: Config) -> PretrainedEncoder:
    """Before any work: `checkpoint` exists, is DCP, holds a ViT or ResNet encoder, and `cfg.model` builds the
    same network (attention kernel aside). Reads meta.json only; returns what it found, for loading later."""
    encoder = pretrained_encoder(checkpoint)
    path, saved = encoder.path, encoder.cfg
    before, now = saved.model, cfg.model
    for name in vars(before):
        if name != "attn_backend" and getattr(before, name) != getattr(now, name):
            raise ConfigError(
                f"model.{name}: the encoder of {path} was trained with {getattr(before, name)!r}, this config "
                f"says {getattr(now, name)!r}"
            )
    learned = encoder.kind is VisionTransformer and before.pos_embed != "sincos"
    if learned and saved.data.image_size != cfg.data.image_size:
        raise ConfigError(
            f"data.image_size: the encoder of {path} has a trained position table for {saved.data.image_size} px; "
            f"fine-tune at that size, got {cfg.data.image_size}"
        )
    return encoder


@dataclass
class PretrainingRun:
    """Where a fine-tune's encoder came from, for the link between the two MLflow runs."""

    checkpoint: Path
    method: str
    step: int
    run_id: str | None  # the pretraining run's MLflow run, when it was tracked
    tracking_uri: str | None

    def tags(self, role: str = "pretrained") -> dict[str, str]:
        """`role`: the tags' prefix (a fine-tune's `pretrained`, a distillation's `teacher`)."""
        tags = {f"{role}_checkpoint": str(self.checkpoint.resolve()), f"{role}_method": self.method}
        return tags | ({f"{role}_run_id": self.run_id} if self.run_id else {})


def pretraining_run(checkpoint: str | Path) -> PretrainingRun:
    """The run a checkpoint belongs to. Its MLflow run id is in meta.json, or, when the checkpoint was written
    before the (asynchronous) tracker had created the run, in the run directory's tracking/run.json."""
    path = find_checkpoint(checkpoint)
    meta = read_meta(path)
    run_file = read_run_file(path.parent.parent)  # <run>/checkpoints/step_N
    return PretrainingRun(
        path,
        meta["config"]["method"]["name"],
        int(meta["step"]),
        meta.get("mlflow_run_id") or run_file.get("run_id"),
        run_file.get("tracking_uri"),
    )
