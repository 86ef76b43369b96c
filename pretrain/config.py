"""Typed run configuration: TOML files in configs/ plus `--set key=value` overrides.

Every key is checked against the dataclasses below before any work starts, so a typo or a
wrong type fails in the first second of a 500-node job instead of after the first checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


ENGINE_KINDS = ("single", "ddp", "fsdp", "deepspeed")


class ConfigError(ValueError):
    """A configuration problem, always naming the offending key."""


@dataclass
class RunConfig:
    name: str = "run"
    output_dir: str = "runs"  # the run directory is output_dir/name
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda


@dataclass
class DataConfig:
    shards: str = ""  # manifest.json, a directory, a brace pattern, or comma-separated paths/URLs
    split: str = "train"
    image_size: int = 224
    batch_size: int = 64  # per process and micro-step
    num_workers: int = 4
    shuffle_buffer: int = 1000
    resampled: bool = False
    crop_scale: tuple[float, float] = (0.2, 1.0)
    hflip: float = 0.5
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pin_memory: bool = True
    prefetch_factor: int = 2
    # Joint-embedding views (MoCo v3, DINO); pairs are (first global view, second global view).
    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: tuple[float, float] = (1.0, 0.1)
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    local_crops: int = 0  # DINO multi-crop: number of small local views besides the 2 global ones
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_blur_prob: float = 0.5
    color_augment_on: str = "workers"  # workers: per sample in the data workers | device: batched after transfer


@dataclass
class ModelConfig:
    size: str = "base"  # tiny | small | base | large | huge
    patch_size: int = 16
    in_chans: int = 3
    attn_backend: str = "sdpa"


@dataclass
class MAEConfig:
    mask_ratio: float = 0.75
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix_loss: bool = True


@dataclass
class MoCoConfig:
    proj_dim: int = 256
    mlp_dim: int = 4096
    temperature: float = 0.2
    momentum: float = 0.99  # base EMA momentum of the key encoder, raised to 1 on a cosine over training
    freeze_patch_embed: bool = True  # the paper's random, frozen patch projection (stabilizes ViT training)


@dataclass
class DINOConfig:
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    norm_last_layer: bool = True  # weight-normalized last layer with its norm fixed to 1
    student_temp: float = 0.1
    teacher_temp: float = 0.04
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum: float = 0.996  # base teacher EMA momentum, raised to 1 on a cosine over training
    freeze_last_layer_steps: int = 0  # the last head layer gets no updates for this many steps (DINO: 1 epoch)


@dataclass
class MethodConfig:
    name: str = "mae"
    mae: MAEConfig = field(default_factory=MAEConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    lr_scaling: str = "linear"  # linear: lr = base_lr * global_batch / 256; none: lr = base_lr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = (
        -1.0
    )  # >= 0: weight decay follows a cosine from weight_decay to this (DINO); < 0: constant
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 0.0  # 0 disables clipping (the norm is still measured and logged)
    accum_steps: int = 1


@dataclass
class TrainConfig:
    steps: int = 1000
    log_every: int = 10
    ckpt_every: int = 500
    keep_last: int = 3
    async_checkpoint: bool = False  # write periodic checkpoints in the background (DCP engines)
    resume: str = "auto"  # auto | none | path to a checkpoint directory
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    on_nonfinite: str = "stop"  # stop: checkpoint the last good state and exit | skip: drop the step
    max_nonfinite_skips: int = 10  # consecutive skipped steps before stopping anyway
    vis_every: int = 0  # log method pictures (e.g. MAE reconstructions) every N steps; 0 = never


@dataclass
class EngineConfig:
    kind: str = "single"  # single | ddp | fsdp | deepspeed
    zero_stage: int = 2  # deepspeed: ZeRO stage 1, 2 or 3
    reshard_after_forward: bool = (
        True  # fsdp: free gathered parameters after forward (less memory, one more all-gather)
    )
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    meta_init: bool = False  # fsdp: build on the meta device so no rank ever holds the whole model
    activation_checkpointing: bool = (
        False  # recompute each transformer block in backward instead of storing activations
    )
    compile: bool = False  # torch.compile each transformer block


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else a sqlite store in the run directory
    experiment: str = "pretrain"
    flush_interval: float = 5.0  # seconds between background sends
    close_timeout: float = 30.0  # at the end of a run, how long to try delivering what is still queued


@dataclass
class EvalConfig:
    shards: str = ""  # empty: the training data.shards
    image_size: int = 0  # 0: data.image_size
    batch_size: int = 256
    k: int = 20
    temperature: float = 0.07
    pool: str = "mean"  # mean | cls


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir) / self.run.name

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_to_plain(v) for v in value]
    return value


# ---------------------------------------------------------------- loading and type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _build(cls: type, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}; known keys in this section: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in raw:
            continue
        tp, value, key = hints[name], raw[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (table), got {value!r}")
            kwargs[name] = _build(tp, value, f"{key}.")
        else:
            if isinstance(value, dict):
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got a section")
            kwargs[name] = _coerce(value, tp, key)
    return cls(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`optim.lr=3e-4` -> (["optim", "lr"], 0.0003); values use TOML syntax, bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{text}': '{part}' is a value, not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML file (or defaults), apply overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: invalid TOML: {exc}") from exc
    raw = apply_overrides(raw, overrides or [])
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Rebuild a config saved in a checkpoint (same checks as a file)."""
    cfg = _build(Config, raw, "")
    validate(cfg)
    return cfg


# ---------------------------------------------------------------- cross-field validation


def _choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: Config) -> None:
    """Reject impossible combinations; each message names the key to change."""
    from kernels.attention import available_backends
    from pretrain.methods.registry import METHODS
    from pretrain.models.vit import VIT_SIZES

    _choice("run.device", cfg.run.device, ("auto", "cpu", "cuda"))
    _choice("model.size", cfg.model.size, VIT_SIZES)
    _choice("model.attn_backend", cfg.model.attn_backend, available_backends())
    _choice("method.name", cfg.method.name, METHODS)
    _choice("optim.lr_scaling", cfg.optim.lr_scaling, ("linear", "none"))
    _choice("train.precision", cfg.train.precision, ("auto", "fp32", "bf16"))
    _choice("train.on_nonfinite", cfg.train.on_nonfinite, ("stop", "skip"))
    _choice("engine.kind", cfg.engine.kind, ENGINE_KINDS)
    _choice("engine.zero_stage", str(cfg.engine.zero_stage), ("1", "2", "3"))
    if cfg.train.async_checkpoint and cfg.engine.kind == "deepspeed":
        raise ConfigError("train.async_checkpoint: DeepSpeed writes its own checkpoints synchronously; use false")
    for key in ("meta_init", "cpu_offload"):
        if getattr(cfg.engine, key) and cfg.engine.kind != "fsdp":
            raise ConfigError(f"engine.{key}: only the fsdp engine supports it (engine.kind is '{cfg.engine.kind}')")
    _choice("eval.pool", cfg.eval.pool, ("mean", "cls"))

    for key, value in [
        ("data.image_size", cfg.data.image_size),
        ("data.batch_size", cfg.data.batch_size),
        ("model.patch_size", cfg.model.patch_size),
        ("model.in_chans", cfg.model.in_chans),
        ("optim.base_lr", cfg.optim.base_lr),
        ("optim.accum_steps", cfg.optim.accum_steps),
        ("train.steps", cfg.train.steps),
        ("train.log_every", cfg.train.log_every),
        ("train.keep_last", cfg.train.keep_last),
        ("eval.batch_size", cfg.eval.batch_size),
        ("eval.k", cfg.eval.k),
        ("eval.temperature", cfg.eval.temperature),
        ("tracking.flush_interval", cfg.tracking.flush_interval),
    ]:
        _positive(key, value)
    for key, value in [
        ("data.num_workers", cfg.data.num_workers),
        ("data.shuffle_buffer", cfg.data.shuffle_buffer),
        ("optim.min_lr", cfg.optim.min_lr),
        ("optim.weight_decay", cfg.optim.weight_decay),
        ("optim.warmup_steps", cfg.optim.warmup_steps),
        ("optim.grad_clip", cfg.optim.grad_clip),
        ("train.ckpt_every", cfg.train.ckpt_every),
        ("train.vis_every", cfg.train.vis_every),
        ("eval.image_size", cfg.eval.image_size),
        ("tracking.close_timeout", cfg.tracking.close_timeout),
    ]:
        _positive(key, value, allow_zero=True)

    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name: must be a non-empty name without '/', got {cfg.run.name!r}")
    if cfg.data.image_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} is not a multiple of model.patch_size {cfg.model.patch_size}"
        )
    lo, hi = cfg.data.crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.crop_scale: need 0 < min <= max <= 1, got {cfg.data.crop_scale}")
    if not 0 <= cfg.data.hflip <= 1:
        raise ConfigError(f"data.hflip: a probability in [0, 1], got {cfg.data.hflip}")
    if any(s <= 0 for s in cfg.data.std):
        raise ConfigError(f"data.std: must be positive, got {cfg.data.std}")
    if cfg.data.prefetch_factor < 1:
        raise ConfigError(f"data.prefetch_factor: must be >= 1, got {cfg.data.prefetch_factor}")
    if cfg.optim.warmup_steps > cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps: {cfg.optim.warmup_steps} exceeds train.steps {cfg.train.steps}")
    if cfg.optim.min_lr > cfg.optim.base_lr:
        raise ConfigError(f"optim.min_lr: {cfg.optim.min_lr} exceeds optim.base_lr {cfg.optim.base_lr}")
    if not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas: each must be in [0, 1), got {cfg.optim.betas}")
    if cfg.train.max_nonfinite_skips < 1:
        raise ConfigError(f"train.max_nonfinite_skips: must be >= 1, got {cfg.train.max_nonfinite_skips}")

    if cfg.method.name == "mae":
        mae = cfg.method.mae
        if not 0 < mae.mask_ratio < 1:
            raise ConfigError(f"method.mae.mask_ratio: must be in (0, 1), got {mae.mask_ratio}")
        _positive("method.mae.decoder_depth", mae.decoder_depth)
        _positive("method.mae.decoder_heads", mae.decoder_heads)
        if mae.decoder_dim % mae.decoder_heads:
            raise ConfigError(
                f"method.mae.decoder_dim: {mae.decoder_dim} is not divisible by method.mae.decoder_heads {mae.decoder_heads}"
            )
