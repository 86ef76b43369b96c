"""The one list of methods. Adding a method is a file that ends in a `SPEC` and one line here.

The `method` config section is assembled from the specs: `method.name` picks one, and every spec's
dataclass becomes the section `method.<name>`.
"""

from __future__ import annotations

from pretrain.config import Config, ConfigError, MethodConfig, check_choice, with_sections
from pretrain.methods import (
    colorization,
    cpc,
    dino,
    dinov2,
    dit,
    dit_distill,
    finetune,
    gan,
    gpt,
    inpainting,
    jigsaw,
    mae,
    moco,
    moco_queue,
    pixelcnn,
    relative_patch,
    rotation,
    simclr,
    vae,
    vq,
)
from pretrain.methods.base import Method
from pretrain.methods.spec import MethodSpec

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        mae.SPEC,
        moco.SPEC,
        dino.SPEC,
        dinov2.SPEC,
        dit.SPEC,
        dit_distill.SPEC,
        vae.SPEC,
        vq.SPEC,
        rotation.SPEC,
        jigsaw.SPEC,
        relative_patch.SPEC,
        inpainting.SPEC,
        colorization.SPEC,
        simclr.SPEC,
        moco_queue.SPEC_V1,
        moco_queue.SPEC_V2,
        cpc.SPEC,
        pixelcnn.SPEC,
        gpt.SPEC,
        gan.SPEC,
        finetune.SPEC,
    )
}

# The `method` section: `name` plus one section per method.
MethodsConfig = with_sections(
    MethodConfig, "MethodsConfig", __name__, {name: spec.config for name, spec in METHODS.items()}
)


def validate_method(cfg: Config) -> None:
    """The chosen method's own checks (its section, and the core settings it depends on)."""
    check_choice("method.name", cfg.method.name, METHODS)
    spec = METHODS[cfg.method.name]
    if spec.players and cfg.engine.kind == "deepspeed":
        raise ConfigError(
            f"engine.kind: method {spec.name!r} trains players with optimizers of their own; DeepSpeed's engine owns "
            "exactly one optimizer over its flattened (ZeRO) gradients, where a player cannot step alone. Use "
            "engine.kind = 'single', 'ddp' or 'fsdp'"
        )
    if spec.validate is not None:
        spec.validate(cfg)


def preflight_method(cfg: Config) -> None:
    """The chosen method's checks against the files the run reads (`MethodSpec.preflight`)."""
    check = METHODS[cfg.method.name].preflight
    if check is not None:
        check(cfg)


def encoder_checkpoint(cfg: Config) -> str:
    """The checkpoint whose encoder a new run of this method starts from ("" for none)."""
    source = METHODS[cfg.method.name].encoder_checkpoint
    return source(cfg) if source is not None else ""


def teacher_checkpoint(cfg: Config) -> str:
    """The checkpoint of the frozen teacher this run distills ("" for none)."""
    source = METHODS[cfg.method.name].teacher_checkpoint
    return source(cfg) if source is not None else ""


def check_teacher(cfg: Config, teacher: Config) -> None:
    """Whether this run can distill the teacher whose run's config is `teacher` (ConfigError naming the key)."""
    check = METHODS[cfg.method.name].check_teacher
    if check is not None:
        check(cfg, teacher)


def build_method(cfg: Config) -> Method:
    return METHODS[cfg.method.name].build(cfg)


def build_train_transform(cfg: Config):
    return METHODS[cfg.method.name].train_transform(cfg)


def build_device_transform(cfg: Config):
    """The method's batch transform on the device, or None."""
    make = METHODS[cfg.method.name].device_transform
    return make(cfg) if make is not None else None


def flops_per_sample(cfg: Config) -> dict[str, float] | None:
    """{"forward": ..., "train": ...} analytic FLOPs of one sample, or None for methods without a count."""
    count = METHODS[cfg.method.name].flops
    return count(cfg).summary() if count is not None else None
