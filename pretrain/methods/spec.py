"""What a method exports: one `MethodSpec` bundles everything the rest of the system needs to know of it.

A method's file declares its config section, validation, builder, transforms, FLOP count and pictures
(the `visuals` of its Method), and ends with a SPEC; pretrain/methods/registry.py lists the specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

from pretrain.activation_memory import Collective
from pretrain.config import Config
from pretrain.flops import FlopCount
from pretrain.methods.base import Method


class CropViews(NamedTuple):
    """The random-resized crops a method trains on, for data backends that crop by themselves (DALI)."""

    # (output side, crop area fraction range) of each view
    views: list[tuple[int, tuple[float, float]]]
    # one view, batched as a tensor; else a list of view tensors
    single: bool


@dataclass(frozen=True)
class MethodSpec:
    # method.name, and the key of its section: method.<name>
    name: str
    # The dataclass of method.<name>; its field types and bounds are checked by the config loader.
    config: type
    build: Callable[[Config], Method]
    # cfg -> (PIL image, torch.Generator) -> tensor, or a list of tensors for multi-view methods.
    train_transform: Callable[[Config], Callable]
    # Relations between fields (its own section and the core ones it uses); messages name the key.
    validate: Callable[[Config], None] | None = None
    # cfg -> batch -> batch on the device after transfer (e.g. batched color augmentation), or None.
    device_transform: Callable[[Config], Callable | None] | None = None
    # cfg -> analytic forward FLOPs of one sample, split into trained and frozen parts (pretrain/flops.py).
    flops: Callable[[Config], FlopCount] | None = None
    # cfg, bytes per activation element, activation checkpointing -> bytes saved for backward per sample,
    # by part (pretrain/activation_memory.py); what `pretrain plan` sizes activations with.
    activations: Callable[[Config, int, bool], dict[str, int]] | None = None
    # cfg, micro-batch, bytes per element -> the collectives the method issues itself every micro-step.
    collectives: Callable[[Config, int, int], list[Collective]] | None = None
    # Whether the averaged network of `ema_pairs` (momentum encoder, teacher) runs forward in training, so
    # a sharded copy of it is gathered every step; an EMA kept only for sampling (DiT) does not. A function of
    # the config where a setting decides it.
    averaged_network_runs_forward: bool | Callable[[Config], bool] = False
    # cfg -> the crops of each image the train transform makes; None: not random-resized crops (DiT latents,
    # the VAE's and pixel DiT's own transforms), so backends that crop by themselves cannot feed it.
    crop_views: Callable[[Config], CropViews] | None = None
    # cfg -> None: checks against the data a run reads (its classes), raised as ConfigError naming the key. The
    # loop runs it before any work; config loading does not, so evaluating a finished run never needs the data.
    preflight: Callable[[Config], None] | None = None
    # cfg -> the checkpoint whose encoder (its method's inference network: a ViT or ResNet) a new run starts
    # from, "" for none. The loop checks it before any work and loads it through `Method.initial_state`.
    encoder_checkpoint: Callable[[Config], str] | None = None
    # cfg -> the checkpoint of a frozen, pretrained teacher this run distills, "" for none. Before any work the
    # loop hands its run's saved config to `check_teacher` (cfg, teacher cfg -> None, raising ConfigError
    # naming the key); a new run loads the teacher through `Method.teacher_sources` and `teacher_state`, a
    # resumed one from its own checkpoint.
    teacher_checkpoint: Callable[[Config], str] | None = None
    check_teacher: Callable[[Config, Config], None] | None = None
    # The method trains several networks with optimizers of their own (`Method.players`). Engines that hold one
    # optimizer over flattened gradients (DeepSpeed) are refused before any work.
    players: bool = False
    # cfg -> overrides for settings the method reads from the data's manifest (a latent scale, steps per
    # epoch), for runs on synthetic batches without shards (`pretrain bench --synthetic-data`).
    synthetic_overrides: Callable[[Config], list[str]] | None = None
