"""What a method exports: one `MethodSpec` bundles everything the rest of the system needs to know of it.

A method's file declares its config section, validation, builder, transforms, FLOP count and pictures
(the `visuals` of its Method), and ends with a SPEC; pretrain/methods/registry.py lists the specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pretrain.config import Config
from pretrain.flops import FlopCount
from pretrain.methods.base import Method


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
