"""Typed run configuration: the sections every run has, and the machinery that checks a TOML file.

Every key is checked against the dataclasses before any work starts, so a typo, a wrong type or an
out-of-range value fails in the first second of a 500-node job instead of after the first checkpoint.

What is checked where:
- the type of every field from its annotation; `Literal[...]` fields accept only their options;
- numeric bounds from field metadata (`bounded(0.75, gt=0, lt=1)`), element-wise for tuples;
- relations between fields of these core sections in `validate_core`.

This module knows no method and no engine. `method.<name>` and `engine.<kind>` sections are
dataclasses declared next to the code they configure and assembled by their registries
(`pretrain/methods/registry.py`, `pretrain/engines/__init__.py`); `pretrain/recipes.py` loads a file
against the assembled schema and runs every validation.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from kernels.attention import AttentionBackend

# What a ViT's pooled feature is: its cls token or the mean of its patch tokens (models/vit.py, eval.pool,
# and the methods whose heads read a pooled feature).
FeaturePool = Literal["cls", "mean"]


# Options of the ViT backbone (model.*); pretrain/models/vit.py takes its option lists from these.
PosEmbed = Literal["sincos", "learned", "learned_cls"]
PosInterpolation = Literal["size", "scale_offset"]
ViTInit = Literal["xavier", "xavier_split_qkv", "trunc_normal"]
# The backbone of the methods that pretrain an encoder (pretrain/methods/backbone.py builds it).
BackboneArch = Literal["vit", "resnet18", "resnet50"]
# ResNet stem: imagenet (7x7 stride-2 conv + max-pool) | small (3x3 stride-1 conv, no max-pool: the CIFAR
# convention of the SimCLR paper's appendix B.9, for 32 px and digit-sized images).
ResNetStem = Literal["imagenet", "small"]
# ResNet normalization: batch (torchvision's BatchNorm2d) | layer (a layer norm over each sample's channels and
# space in every BN's place, same parameter names; CPC v2's encoder, Henaff et al. 2019 section 4.1).
ResNetNorm = Literal["batch", "layer"]


class UserError(Exception):
    """A mistake in what the user asked for, or an environment that cannot run it (a locked or read-only
    run directory, a full disk). The command line prints the message as one line and exits with 2; the
    traceback is kept only with `--debug`."""


class ConfigError(UserError, ValueError):
    """A configuration problem, always naming the offending key."""


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A dataclass field whose value (each element, for tuples) must lie within the given bounds."""
    return field(default=default, metadata={"bounds": (ge, gt, le, lt)})


def _check_bounds(key: str, value: Any, bounds: tuple[float | None, ...]) -> None:
    ge, gt, le, lt = bounds
    low, high = (ge if ge is not None else gt), (le if le is not None else lt)
    for element in value if isinstance(value, tuple) else (value,):
        inside = (ge is None or element >= ge) and (gt is None or element > gt)
        inside = inside and (le is None or element <= le) and (lt is None or element < lt)
        if inside:
            continue
        if low is not None and high is not None:
            wanted = f"in {'[' if ge is not None else '('}{low:g}, {high:g}{']' if le is not None else ')'}"
        elif low is not None:
            wanted = f"{'>=' if ge is not None else '>'} {low:g}"
        else:
            wanted = f"{'<=' if le is not None else '<'} {high:g}"
        what = "each value must be" if isinstance(value, tuple) else "must be"
        raise ConfigError(f"{key}: {what} {wanted}, got {value}")


# ---------------------------------------------------------------------- the core sections


@dataclass
class RunConfig:
    name: str = "run"
    # The run directory is output_dir/name.
    output_dir: str = "runs"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass
class DataConfig:
    # manifest.json, a directory, a brace pattern, or comma-separated paths/URLs.
    shards: str = ""
    split: str = "train"
    image_size: int = bounded(224, gt=0)
    # Per process and micro-step.
    batch_size: int = bounded(64, gt=0)
    num_workers: int = bounded(4, ge=0)
    shuffle_buffer: int = bounded(1000, ge=0)
    resampled: bool = False
    crop_scale: tuple[float, float] = bounded((0.2, 1.0), gt=0, le=1)
    hflip: float = bounded(0.5, ge=0, le=1)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = bounded(IMAGENET_STD, gt=0)
    pin_memory: bool = True
    prefetch_factor: int = bounded(2, ge=1)
    # Joint-embedding views (MoCo v3, DINO); pairs are (first global view, second global view).
    # Color jitter strengths: brightness, contrast, saturation, hue.
    color_jitter: tuple[float, float, float, float] = bounded((0.4, 0.4, 0.2, 0.1), ge=0)
    color_jitter_prob: float = bounded(0.8, ge=0, le=1)
    grayscale_prob: float = bounded(0.2, ge=0, le=1)
    blur_prob: tuple[float, float] = bounded((1.0, 0.1), ge=0, le=1)
    blur_sigma: tuple[float, float] = bounded((0.1, 2.0), gt=0)
    solarize_prob: tuple[float, float] = bounded((0.0, 0.2), ge=0, le=1)
    # DINO multi-crop: number of small local views besides the 2 global ones.
    local_crops: int = bounded(0, ge=0)
    local_crop_size: int = bounded(96, gt=0)
    local_crop_scale: tuple[float, float] = bounded((0.05, 0.4), gt=0, le=1)
    local_blur_prob: float = bounded(0.5, ge=0, le=1)
    # device: batched after transfer (measured faster) | workers: per sample in the data workers.
    color_augment_on: Literal["device", "workers"] = "device"
    # fast: crop boxes drawn from the JPEG header, DCT-domain reduced decode, torch resize, uint8 to the
    # device (data_pipeline/fast_crops.py) | reference: full PIL decode, PIL resize, float in the workers.
    decode: Literal["fast", "reference"] = "fast"
    # pil: the WebDataset reader in DataLoader workers | dali: NVIDIA DALI (extra [dali]; pretrain/data.py).
    backend: Literal["pil", "dali"] = "pil"
    # Train on a class-balanced fraction of the split's labelled samples (semi-supervised fine-tuning: SimCLR's
    # 0.01 and 0.1), drawn from label_seed and the sample keys (data_pipeline/label_subset.py). 1: all samples.
    label_fraction: float = bounded(1.0, gt=0, le=1)
    label_seed: int = 0


@dataclass
class ModelConfig:
    """The encoder backbone of the methods that pretrain one (MAE, MoCo v3, DINO, SimCLR): a ViT (the fields
    below `resnet_norm`) or a ResNet; DiT and the VAE have their own."""

    # vit | resnet18 | resnet50 (torchvision's layout, pretrain/models/resnet.py). Methods say which they take.
    arch: BackboneArch = "vit"
    # ResNet only: see ResNetStem.
    resnet_stem: ResNetStem = "imagenet"
    # ResNet only: start each residual block's last BN scale at 0 (Goyal et al. 2017); torchvision's default off.
    resnet_zero_init_residual: bool = False
    # ResNet only: see ResNetNorm.
    resnet_norm: ResNetNorm = "batch"
    # tiny | small | base | large | huge | giant2 (DINOv2's ViT-g; pretrain/models/vit.py: VIT_SIZES).
    size: str = "base"
    patch_size: int = bounded(16, gt=0)
    in_chans: int = bounded(3, gt=0)
    attn_backend: AttentionBackend = "sdpa"
    # Attention heads; 0: the size's (small: 6, as DeiT and DINO; the MoCo v3 paper's ViT-S has 12).
    num_heads: int = bounded(0, ge=0)
    # sincos: fixed table (MAE, MoCo v3) | learned: trained N x D | learned_cls: trained (N + 1) x D, the
    # first row added to the cls token (DINO).
    pos_embed: PosEmbed = "sincos"
    # The sin-cos table's first half of channels encodes the column (MAE, DiT) or the row (MoCo v3).
    sincos_order: Literal["col_first", "row_first"] = "col_first"
    # Positions for a smaller input (DINO's local crops): size: bicubic to the new grid g | scale_offset:
    # bicubic with scale factor (g + 0.1) / G (the DINO reference).
    pos_interpolation: PosInterpolation = "size"
    # xavier (MAE) | xavier_split_qkv: q, k, v each Xavier, cls N(0, 1e-6) (MoCo v3) | trunc_normal: std 0.02
    # linears, cls and learned positions, default patch conv (DINO). pretrain/models/vit.py says more.
    init: ViTInit = "xavier"
    # > 0: LayerScale on every residual branch, started at this value (DINOv2: 1e-5); 0: none.
    layer_scale: float = bounded(0.0, ge=0)
    # mlp | swiglu: DINOv2's gated feed-forward (ViT-g/14), two thirds of the MLP's width rounded up to 8.
    ffn: Literal["mlp", "swiglu"] = "mlp"
    # Register tokens after the cls token (Darcet et al. 2024; DINOv2 with registers: 4); no output of the
    # patches includes them.
    num_register_tokens: int = bounded(0, ge=0)
    # Stochastic depth (its rate is the method's): per_sample (timm) | subset (DINOv2: a block whose rate
    # exceeds 0.1 runs its branches on a random subset of the batch, the rest skip the compute).
    drop_path_mode: Literal["per_sample", "subset"] = "per_sample"


@dataclass
class MethodConfig:
    """`name` picks the method. Each method's own section, method.<name>, is declared in its file and
    added to this class by the method registry."""

    name: str = "mae"


@dataclass
class OptimConfig:
    # adamw | sgd (momentum, optionally Nesterov) | lars (SGD with layer-wise trust ratios, You et al. 2017,
    # as SimCLR and BYOL use it). pretrain/optim.py builds them.
    name: Literal["adamw", "sgd", "lars"] = "adamw"
    base_lr: float = bounded(1.5e-4, gt=0)
    # linear: lr = base_lr * global_batch / 256 | sqrt: base_lr * sqrt(global_batch / 1024) (DINOv2; min_lr
    # stays absolute) | none: lr = base_lr.
    lr_scaling: Literal["linear", "sqrt", "none"] = "linear"
    min_lr: float = bounded(0.0, ge=0)
    weight_decay: float = bounded(0.05, ge=0)
    # Decay biases and normalization weights too (MoCo v1/v2's released code decays every parameter); by
    # default they are left out, as MAE, MoCo v3, DINO, SimCLR and BYOL do.
    decay_biases_and_norms: bool = False
    # >= 0: a cosine from weight_decay to this (DINO); < 0: constant.
    weight_decay_end: float = -1.0
    betas: tuple[float, float] = bounded((0.9, 0.95), ge=0, lt=1)
    eps: float = bounded(1e-8, gt=0)
    # sgd and lars: heavy-ball momentum, and Nesterov's variant of it.
    momentum: float = bounded(0.9, ge=0, lt=1)
    nesterov: bool = False
    # lars: the trust coefficient eta of the layer-wise rate eta * |w| / |g + wd w| (SimCLR, BYOL: 1e-3).
    lars_eta: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(0, ge=0)
    # After the warmup: cosine: half a cosine from the peak to min_lr at the last step | step: the peak,
    # times lr_gamma from each of lr_milestones on, given as fractions of train.steps (MoCo v1's x0.1 at
    # epochs 120 and 160 of 200: [0.6, 0.8]), so a shortened run or a benchmark keeps the shape.
    schedule: Literal["cosine", "step"] = "cosine"
    lr_milestones: tuple[float, ...] = ()
    lr_gamma: float = bounded(0.1, gt=0, le=1)
    # 0 disables clipping (the norm is still measured and logged).
    grad_clip: float = bounded(0.0, ge=0)
    accum_steps: int = bounded(1, ge=1)


@dataclass
class PlayerSettings:
    """One player's optimizer settings, for methods that train several networks each with its own optimizer
    (a GAN's generator and discriminator). Unset values (0, (), -1) take [optim]'s; the optimizer algorithm
    (optim.name), its eps and the schedule's shape are [optim]'s for every player."""

    # Peak learning rate before optim.lr_scaling; 0: optim.base_lr.
    base_lr: float = bounded(0.0, ge=0)
    betas: tuple[float, ...] = ()
    weight_decay: float = -1.0
    warmup_steps: int = -1
    min_lr: float = -1.0
    grad_clip: float = -1.0
    # The update ratio: this player steps on optimizer steps 1, 1 + every, 1 + 2 every, ...
    every: int = bounded(1, ge=1)

    def resolve(self, optim: OptimConfig) -> OptimConfig:
        """[optim] with this player's settings in place of the unset ones."""
        changes: dict[str, Any] = {}
        if self.base_lr > 0:
            changes["base_lr"] = self.base_lr
        if self.betas:
            changes["betas"] = tuple(self.betas)
        for name in ("weight_decay", "warmup_steps", "min_lr", "grad_clip"):
            if getattr(self, name) >= 0:
                changes[name] = getattr(self, name)
        return dataclasses.replace(optim, **changes)


@dataclass
class TrainConfig:
    steps: int = bounded(1000, ge=1)
    log_every: int = bounded(10, ge=1)
    ckpt_every: int = bounded(500, ge=0)
    keep_last: int = bounded(3, ge=1)
    # Write periodic checkpoints in the background (DCP engines).
    async_checkpoint: bool = False
    # auto | none | path to a checkpoint directory.
    resume: str = "auto"
    # A DCP checkpoint (or run directory) whose model weights start a new run at step 0, with a fresh
    # optimizer and schedule: fine-tuning, or training on from `pretrain ckpt import`. Empty: none.
    # A run that resumes from its own checkpoint ignores it.
    init_from: str = ""
    # auto: bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    # stop: checkpoint the last good state and exit | skip: drop the step.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # Consecutive skipped steps before stopping anyway.
    max_nonfinite_skips: int = bounded(10, ge=1)
    # Log method pictures (e.g. MAE reconstructions) every N steps; 0 = never.
    vis_every: int = bounded(0, ge=0)
    # kNN top-1 of the encoder on eval.shards every N steps, as the metric knn_top1; 0 = never.
    knn_every: int = bounded(0, ge=0)
    # Seconds without a finished step before every rank dumps stacks and exits; 0 = off.
    watchdog_timeout: float = bounded(1800.0, ge=0)
    # Device bf16 peak for MFU; 0: from the GPU's name (pretrain/flops.py), none on CPU.
    peak_tflops: float = bounded(0.0, ge=0)


@dataclass
class EngineConfig:
    """`kind` picks the engine. Options of one engine, engine.<kind>, are declared in its file and
    added to this class by the engine registry; the two below apply to every engine."""

    kind: str = "single"
    # Recompute each transformer block in backward instead of storing activations.
    activation_checkpointing: bool = False
    # torch.compile each transformer block.
    compile: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    # Empty: $MLFLOW_TRACKING_URI, else a sqlite store in the run directory.
    uri: str = ""
    experiment: str = "pretrain"
    # Seconds between background sends.
    flush_interval: float = bounded(5.0, gt=0)
    # At the end of a run, how long to try delivering what is still queued.
    close_timeout: float = bounded(30.0, ge=0)
    # CPU/GPU utilization, memory and GPU power under system/ in the run.
    system_metrics: bool = True


@dataclass
class EvalConfig:
    # Empty: the training data.shards.
    shards: str = ""
    # 0: data.image_size.
    image_size: int = bounded(0, ge=0)
    batch_size: int = bounded(256, gt=0)
    k: int = bounded(20, gt=0)
    temperature: float = bounded(0.07, gt=0)
    pool: FeaturePool = "mean"
    # Linear probe: base SGD lr; the probe tries 0.1x..10x of it on a held-out split.
    linear_lr: float = bounded(0.1, gt=0)
    linear_sweep: bool = True
    linear_epochs: int = bounded(100, gt=0)
    linear_batch_size: int = bounded(256, gt=0)
    linear_val_fraction: float = bounded(0.1, gt=0, lt=1)
    # The fine-tuning recipe `pretrain eval finetune` uses for this run's checkpoints when given no --config.
    finetune_config: str = ""


@dataclass
class LaunchConfig:
    """Defaults for `pretrain launch slurm` (its flags override them), so a recipe carries its cluster shape."""

    nodes: int = bounded(1, ge=1)
    # 0: CPU processes, nproc_per_node of them.
    gpus_per_node: int = bounded(0, ge=0)
    # Processes per node when gpus_per_node is 0.
    nproc_per_node: int = bounded(1, ge=1)
    # 0: SLURM's default.
    cpus_per_task: int = bounded(0, ge=0)
    partition: str = ""
    # SLURM time limit, e.g. 24:00:00 or 2-00:00:00; empty: the partition's default.
    time: str = ""
    account: str = ""
    qos: str = ""
    constraint: str = ""
    # torchrun: one torchrun per node (elastic restarts) | srun: one task per process.
    launcher: Literal["torchrun", "srun"] = "torchrun"
    # torchrun: restarts of all workers within one allocation after a failure.
    max_restarts: int = bounded(0, ge=0)
    # Seconds before the time limit SLURM sends USR1 (checkpoint, then requeue); 0 = none.
    signal_lead: int = bounded(120, ge=0)
    # Requeue the job after a USR1 stop.
    requeue: bool = True
    # Exported in the job, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA.
    env: dict[str, str] = field(default_factory=dict)


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
    launch: LaunchConfig = field(default_factory=LaunchConfig)

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


def with_sections(base: type, name: str, module: str, sections: dict[str, type]) -> type:
    """`base` plus one field per entry of `sections` (a dataclass each, default-constructed): how the
    registries attach method.<name> and engine.<kind> sections without this module knowing them.
    The class is `module.name`, so it pickles like a written one."""
    fields = [(key, section, field(default_factory=section)) for key, section in sections.items()]
    cls = dataclasses.make_dataclass(name, fields, bases=(base,))
    cls.__module__ = module
    return cls


# ---------------------------------------------------------------------- loading and type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        options = typing.get_args(tp)
        if value not in options or isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, options))}")
        return value
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[T, ...]: any length
            if not isinstance(value, (list, tuple)):
                raise ConfigError(f"{key}: expected a list of {_type_name(args[0])} values, got {value!r}")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{key}: expected a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        key_type, value_type = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a table of {_type_name(value_type)} values, got {value!r}")
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
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


def build_section(cls: type, raw: dict[str, Any], prefix: str = "") -> Any:
    """An instance of the dataclass `cls` from a TOML table: unknown keys, wrong types and values out of
    their bounds fail naming the key; missing keys keep their defaults (bounds are checked on those too)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            full = f"{prefix}{key}"
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown key '{full}'{hint}; known keys in this section: {', '.join(fields)}")
    kwargs = {}
    for name, spec in fields.items():
        tp, key = hints[name], f"{prefix}{name}"
        if dataclasses.is_dataclass(tp):
            value = raw.get(name, {})
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a section (table), got {value!r}")
            kwargs[name] = build_section(tp, value, f"{key}.")
            continue
        if name in raw:
            if isinstance(raw[name], dict) and typing.get_origin(tp) is not dict:
                raise ConfigError(f"{key}: expected {_type_name(tp)}, got a section")
            kwargs[name] = _coerce(raw[name], tp, key)
        if "bounds" in spec.metadata:
            _check_bounds(key, kwargs.get(name, spec.default), spec.metadata["bounds"])
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


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


# ---------------------------------------------------------------------- relations between core fields


def _ordered(key: str, pair: tuple[float, float]) -> None:
    if pair[0] > pair[1]:
        raise ConfigError(f"{key}: need min <= max, got {pair}")


# optim.* fields each optimizer reads beyond the shared ones; the others must stay at their defaults.
OPTIMIZER_FIELDS = {
    "adamw": ("betas", "eps"),
    "sgd": ("momentum", "nesterov"),
    "lars": ("momentum", "nesterov", "lars_eta"),
}


def _optimizer_fields_read(optim: OptimConfig) -> None:
    defaults = {f.name: f.default for f in dataclasses.fields(OptimConfig)}
    unread = {name for fields in OPTIMIZER_FIELDS.values() for name in fields} - set(OPTIMIZER_FIELDS[optim.name])
    for name in sorted(unread):
        if getattr(optim, name) != defaults[name]:
            raise ConfigError(
                f"optim.{name}: {getattr(optim, name)!r} is not read by optim.name={optim.name!r}; "
                f"leave it at its default {defaults[name]!r}"
            )


def _schedule_fields(optim: OptimConfig) -> None:
    if optim.schedule == "cosine":
        if optim.lr_milestones:
            raise ConfigError(
                f"optim.lr_milestones: {list(optim.lr_milestones)} are read only by optim.schedule='step'; "
                "set optim.schedule or leave them empty"
            )
        return
    milestones = list(optim.lr_milestones)
    if not milestones or milestones != sorted(set(milestones)) or not 0 < milestones[0] <= milestones[-1] < 1:
        raise ConfigError(
            f"optim.lr_milestones: optim.schedule='step' needs increasing fractions of train.steps in (0, 1), "
            f"got {milestones}"
        )
    if optim.min_lr:
        raise ConfigError(f"optim.min_lr: {optim.min_lr} is read only by optim.schedule='cosine'; set 0")


def validate_core(cfg: Config) -> None:
    """Relations between fields of the core sections; each message names the key to change."""
    if not cfg.run.name or "/" in cfg.run.name:
        raise ConfigError(f"run.name: must be a non-empty name without '/', got {cfg.run.name!r}")
    data, optim, launch = cfg.data, cfg.optim, cfg.launch
    for key in ("crop_scale", "blur_sigma", "local_crop_scale"):
        _ordered(f"data.{key}", getattr(data, key))
    if data.color_jitter[3] > 0.5:
        raise ConfigError(f"data.color_jitter: hue must be <= 0.5, got {data.color_jitter}")
    if optim.warmup_steps > cfg.train.steps:
        raise ConfigError(f"optim.warmup_steps: {optim.warmup_steps} exceeds train.steps {cfg.train.steps}")
    _optimizer_fields_read(optim)
    if optim.min_lr > optim.base_lr:
        raise ConfigError(f"optim.min_lr: {optim.min_lr} exceeds optim.base_lr {optim.base_lr}")
    _schedule_fields(optim)
    if optim.decay_biases_and_norms and optim.name == "lars":
        raise ConfigError(
            "optim.decay_biases_and_norms: LARS keeps biases and normalization weights out of its trust ratio "
            "and of weight decay; set false"
        )
    if launch.time and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", launch.time):
        raise ConfigError(f"launch.time: '{launch.time}' is not a SLURM time limit (HH:MM:SS or D-HH:MM:SS)")
    for name in launch.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"launch.env.{name}: not a valid environment variable name")


def check_choice(key: str, value: str, choices: typing.Iterable[str]) -> None:
    """For option lists that live in a registry (method.name, engine.kind) or a model's table of sizes."""
    choices = list(choices)
    if value not in choices:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(choices)}")
