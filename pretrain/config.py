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
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: tuple[float, float] = (0.0, 0.2)
    local_crops: int = 0  # DINO multi-crop: number of small local views besides the 2 global ones
    local_crop_size: int = 96
    local_crop_scale: tuple[float, float] = (0.05, 0.4)
    local_blur_prob: float = 0.5
    color_augment_on: str = (
        "device"  # device: batched after transfer (measured faster) | workers: per sample in the data workers
    )
    # fast: crop boxes drawn from the JPEG header, DCT-domain reduced decode, torch resize, uint8 to the
    # device (data_pipeline/fast_crops.py) | reference: full PIL decode, PIL resize, float in the workers
    decode: str = "fast"
    backend: str = "pil"  # pil: WebDataset reader in DataLoader workers | dali: NVIDIA DALI (extra [dali])


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
    infonce_impl: str = "auto"  # auto (fused/tiled kernel for the device) | reference (the plain formula)


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
    pool: str = "cls"  # the head's input: cls token (the paper) | mean of the patch tokens


@dataclass
class DiTConfig:
    # The DiT network (the ViT `model.*` section does not apply to DiT).
    size: str = "XL"  # S | B | L | XL, the DiT paper's sizes
    hidden_dim: int = 0  # nonzero: override the size's width, depth or heads (small CPU models)
    depth: int = 0
    num_heads: int = 0
    patch_size: int = 2  # 2, 4 or 8
    input_size: int = 32  # side of the network's input: latent side (image side / VAE factor), or pixels
    in_channels: int = 4  # latent channels, or image channels (1 or 3) in pixel space
    num_classes: int = 1000
    class_dropout: float = 0.1  # probability a label is replaced by the null class (for guidance)
    space: str = "latent"  # latent: data.shards are latent shards (pretrain data latents) | pixel: images in [-1, 1]
    latent_scale: float = 0.0  # latents are multiplied by this; 0: the scale_factor in the latent manifest
    vae: str = ""  # decodes latent samples into pictures: a vae run/checkpoint or a diffusers AutoencoderKL dir
    # Rectified flow: timesteps t = sigmoid(N(t_mean, t_std^2)), shifted toward noise by t_shift > 1.
    t_mean: float = 0.0
    t_std: float = 1.0
    t_shift: float = 1.0
    ema_momentum: float = 0.9999
    ema_warmup: bool = False  # m = min(ema_momentum, (1 + step) / (10 + step)): for short runs
    # Sample grids logged every train.vis_every steps.
    sample_steps: int = 50
    sample_cfg_scale: float = 4.0
    sampler: str = "euler"  # euler | heun


@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 4
    downsample: int = 8  # spatial factor, a power of 2: log2(downsample) + 1 resolution levels
    base_channels: int = 128  # level i has base_channels * min(2^i, 4) channels (SD's 128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    recon_loss: str = "l1"  # l1 | l2
    kl_weight: float = 1e-6
    gan_weight: float = 0.0  # 0: no discriminator
    gan_start: int = 0  # optimizer step from which the generator's adversarial term is on
    disc_channels: int = 64
    disc_layers: int = 3
    pretrained: str = ""  # a diffusers AutoencoderKL directory (config.json + safetensors) to start from


@dataclass
class MethodConfig:
    name: str = "mae"
    mae: MAEConfig = field(default_factory=MAEConfig)
    moco: MoCoConfig = field(default_factory=MoCoConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4
    lr_scaling: str = "linear"  # linear: lr = base_lr * global_batch / 256; none: lr = base_lr
    min_lr: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float = -1.0  # >= 0: a cosine from weight_decay to this (DINO); < 0: constant
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
    knn_every: int = 0  # kNN top-1 of the encoder on eval.shards every N steps, as the metric knn_top1; 0 = never
    watchdog_timeout: float = (
        1800.0  # seconds without a finished step before every rank dumps stacks and exits; 0 = off
    )
    peak_tflops: float = 0.0  # device bf16 peak for MFU; 0: from the GPU's name (pretrain/flops.py), none on CPU


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
    system_metrics: bool = True  # CPU/GPU utilization, memory and GPU power under system/ in the run


@dataclass
class EvalConfig:
    shards: str = ""  # empty: the training data.shards
    image_size: int = 0  # 0: data.image_size
    batch_size: int = 256
    k: int = 20
    temperature: float = 0.07
    pool: str = "mean"  # mean | cls
    linear_lr: float = 0.1  # linear probe: base SGD lr; the probe tries 0.1x..10x of it on a held-out split
    linear_sweep: bool = True
    linear_epochs: int = 100
    linear_batch_size: int = 256
    linear_val_fraction: float = 0.1


@dataclass
class LaunchConfig:
    """Defaults for `pretrain launch slurm` (its flags override them), so a recipe carries its cluster shape."""

    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU processes, nproc_per_node of them
    nproc_per_node: int = 1  # processes per node when gpus_per_node is 0
    cpus_per_task: int = 0  # 0: SLURM's default
    partition: str = ""
    time: str = ""  # SLURM time limit, e.g. 24:00:00 or 2-00:00:00; empty: the partition's default
    account: str = ""
    qos: str = ""
    constraint: str = ""
    launcher: str = "torchrun"  # torchrun: one torchrun per node (elastic restarts) | srun: one task per process
    max_restarts: int = 0  # torchrun: restarts of all workers within one allocation after a failure
    signal_lead: int = 120  # seconds before the time limit SLURM sends USR1 (checkpoint, then requeue); 0 = none
    requeue: bool = True  # requeue the job after a USR1 stop
    env: dict[str, str] = field(default_factory=dict)  # exported in the job, e.g. NCCL_SOCKET_IFNAME, NCCL_IB_HCA


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
            if isinstance(value, dict) and typing.get_origin(tp) is not dict:
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


def _validate_launch(cfg: Config) -> None:
    import re

    launch = cfg.launch
    _choice("launch.launcher", launch.launcher, ("torchrun", "srun"))
    _positive("launch.nodes", launch.nodes)
    _positive("launch.nproc_per_node", launch.nproc_per_node)
    for key in ("gpus_per_node", "cpus_per_task", "max_restarts", "signal_lead"):
        _positive(f"launch.{key}", getattr(launch, key), allow_zero=True)
    _positive("train.watchdog_timeout", cfg.train.watchdog_timeout, allow_zero=True)
    if launch.time and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", launch.time):
        raise ConfigError(f"launch.time: '{launch.time}' is not a SLURM time limit (HH:MM:SS or D-HH:MM:SS)")
    for name in launch.env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ConfigError(f"launch.env.{name}: not a valid environment variable name")


def validate(cfg: Config) -> None:
    """Reject impossible combinations; each message names the key to change."""
    from kernels.attention import available_backends, unavailable_reason
    from pretrain.methods.registry import METHODS
    from pretrain.models.vit import VIT_SIZES

    _choice("run.device", cfg.run.device, ("auto", "cpu", "cuda"))
    _choice("model.size", cfg.model.size, VIT_SIZES)
    if why := unavailable_reason(cfg.model.attn_backend):  # a known backend whose package is missing
        raise ConfigError(f"model.attn_backend: {why}")
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
    _validate_launch(cfg)
    if not 0 < cfg.eval.linear_val_fraction < 1:
        raise ConfigError(f"eval.linear_val_fraction: must be in (0, 1), got {cfg.eval.linear_val_fraction}")
    _choice("method.moco.infonce_impl", cfg.method.moco.infonce_impl, ("auto", "reference", "tiled", "triton"))
    _choice("data.color_augment_on", cfg.data.color_augment_on, ("workers", "device"))
    _choice("data.decode", cfg.data.decode, ("fast", "reference"))
    _choice("data.backend", cfg.data.backend, ("pil", "dali"))
    if cfg.data.backend == "dali":
        _validate_dali(cfg)

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
        ("eval.linear_lr", cfg.eval.linear_lr),
        ("eval.linear_epochs", cfg.eval.linear_epochs),
        ("eval.linear_batch_size", cfg.eval.linear_batch_size),
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
        ("train.knn_every", cfg.train.knn_every),
        ("train.peak_tflops", cfg.train.peak_tflops),
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
    for key in ("color_jitter_prob", "grayscale_prob", "local_blur_prob", "blur_prob", "solarize_prob"):
        value = getattr(cfg.data, key)
        if not all(0 <= p <= 1 for p in (value if isinstance(value, tuple) else (value,))):
            raise ConfigError(f"data.{key}: probabilities must be in [0, 1], got {value}")
    if min(cfg.data.color_jitter) < 0 or cfg.data.color_jitter[3] > 0.5:
        raise ConfigError(f"data.color_jitter: strengths must be >= 0 and hue <= 0.5, got {cfg.data.color_jitter}")
    if not 0 < cfg.data.blur_sigma[0] <= cfg.data.blur_sigma[1]:
        raise ConfigError(f"data.blur_sigma: need 0 < min <= max, got {cfg.data.blur_sigma}")
    if cfg.data.local_crops < 0:
        raise ConfigError(f"data.local_crops: must be >= 0, got {cfg.data.local_crops}")
    lo, hi = cfg.data.local_crop_scale
    if not 0 < lo <= hi <= 1:
        raise ConfigError(f"data.local_crop_scale: need 0 < min <= max <= 1, got {cfg.data.local_crop_scale}")
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
    if cfg.method.name == "moco":
        _validate_moco(cfg)
    if cfg.method.name == "dino":
        _validate_dino(cfg)
    if cfg.method.name == "dit":
        _validate_dit(cfg.method.dit)
    if cfg.method.name == "vae":
        _validate_vae(cfg.method.vae)
        if cfg.data.image_size % cfg.method.vae.downsample:
            raise ConfigError(
                f"data.image_size: {cfg.data.image_size} is not a multiple of method.vae.downsample "
                f"{cfg.method.vae.downsample}"
            )


def _validate_dali(cfg: Config) -> None:
    from data_pipeline.dali_loader import dali_available

    if cfg.method.name not in ("mae", "moco", "dino"):
        raise ConfigError(f"data.backend: 'dali' feeds image methods (mae, moco, dino), not {cfg.method.name}")
    if cfg.data.color_augment_on != "device":
        raise ConfigError("data.color_augment_on: the dali backend leaves color to the device; set 'device'")
    if why := dali_available():
        raise ConfigError(f"data.backend: {why}")


def _validate_dit(dit: DiTConfig) -> None:
    from pretrain.models.dit import DIT_SIZES

    _choice("method.dit.size", dit.size, DIT_SIZES)
    _choice("method.dit.space", dit.space, ("latent", "pixel"))
    _choice("method.dit.sampler", dit.sampler, ("euler", "heun"))
    for key in ("patch_size", "input_size", "in_channels", "num_classes", "t_std", "t_shift", "sample_steps"):
        _positive(f"method.dit.{key}", getattr(dit, key))
    for key in ("hidden_dim", "depth", "num_heads", "latent_scale", "sample_cfg_scale"):
        _positive(f"method.dit.{key}", getattr(dit, key), allow_zero=True)
    if dit.input_size % dit.patch_size:
        raise ConfigError(
            f"method.dit.input_size: {dit.input_size} is not a multiple of method.dit.patch_size {dit.patch_size}"
        )
    hidden, heads = dit.hidden_dim or DIT_SIZES[dit.size][0], dit.num_heads or DIT_SIZES[dit.size][2]
    if hidden % heads or hidden % 4:
        raise ConfigError(f"method.dit.hidden_dim: {hidden} must be divisible by 4 and by num_heads {heads}")
    if not 0 <= dit.class_dropout < 1:
        raise ConfigError(f"method.dit.class_dropout: must be in [0, 1), got {dit.class_dropout}")
    if not 0 <= dit.ema_momentum <= 1:
        raise ConfigError(f"method.dit.ema_momentum: must be in [0, 1], got {dit.ema_momentum}")
    if dit.space == "pixel" and dit.in_channels not in (1, 3):
        raise ConfigError(f"method.dit.in_channels: pixel space takes 1 or 3 channels, got {dit.in_channels}")


def _validate_vae(vae: VAEConfig) -> None:
    _choice("method.vae.recon_loss", vae.recon_loss, ("l1", "l2"))
    for key in ("in_channels", "latent_channels", "downsample", "base_channels", "layers_per_block", "norm_groups"):
        _positive(f"method.vae.{key}", getattr(vae, key))
    for key in ("kl_weight", "gan_weight", "gan_start"):
        _positive(f"method.vae.{key}", getattr(vae, key), allow_zero=True)
    if vae.downsample & (vae.downsample - 1):
        raise ConfigError(f"method.vae.downsample: must be a power of 2, got {vae.downsample}")
    if vae.base_channels % vae.norm_groups:
        raise ConfigError(
            f"method.vae.base_channels: {vae.base_channels} is not divisible by method.vae.norm_groups {vae.norm_groups}"
        )
    if vae.gan_weight > 0 and (vae.disc_channels < 1 or vae.disc_layers < 1):
        raise ConfigError("method.vae.disc_channels: the discriminator needs disc_channels >= 1 and disc_layers >= 1")


def _unit_interval(key: str, value: float, closed_right: bool = True) -> None:
    if not (0 <= value <= 1 if closed_right else 0 <= value < 1):
        raise ConfigError(f"{key}: must be in [0, {'1]' if closed_right else '1)'}, got {value}")


def _validate_moco(cfg: Config) -> None:
    moco = cfg.method.moco
    for key in ("proj_dim", "mlp_dim", "temperature"):
        _positive(f"method.moco.{key}", getattr(moco, key))
    _unit_interval("method.moco.momentum", moco.momentum)
    if cfg.data.local_crops:
        raise ConfigError(
            f"data.local_crops: MoCo v3 uses exactly two views, got {cfg.data.local_crops} local crops; set 0"
        )


def _validate_dino(cfg: Config) -> None:
    dino = cfg.method.dino
    for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers", "student_temp", "teacher_temp"):
        _positive(f"method.dino.{key}", getattr(dino, key))
    _positive("method.dino.warmup_teacher_temp", dino.warmup_teacher_temp)
    for key in ("warmup_teacher_temp_steps", "freeze_last_layer_steps"):
        _positive(f"method.dino.{key}", getattr(dino, key), allow_zero=True)
    _unit_interval("method.dino.momentum", dino.momentum)
    _choice("method.dino.pool", dino.pool, ("cls", "mean"))
    _unit_interval("method.dino.center_momentum", dino.center_momentum, closed_right=False)
    if cfg.data.local_crops and cfg.data.local_crop_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.local_crop_size: {cfg.data.local_crop_size} is not a multiple of model.patch_size {cfg.model.patch_size}"
        )
