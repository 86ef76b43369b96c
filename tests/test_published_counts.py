"""Parameter counts as the papers publish them, from the recipes that follow the papers' conventions."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pretrain.methods.registry import build_method
from pretrain.recipes import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "config,overrides,published",
    [
        ("mae_vit_b16.toml", [], 86_567_656),  # ViT-B/16 (ViT paper, MAE)
        ("mae_vit_b16.toml", ["model.size=large"], 304_326_632),  # ViT-L/16
        ("mae_vit_b16.toml", ["model.size=huge", "model.patch_size=14"], 632_045_800),  # ViT-H/14
        ("dino_vit_b16.toml", ["method.dino.steps_per_epoch=1251"], 86_567_656),  # learned table: a parameter
        ("moco_v3_vit_b16.toml", [], 86_567_656),  # frozen patch projection included
        ("dit_xl2.toml", ["method.dit.latent_scale=0.18215"], 675_129_632),  # DiT-XL/2, the released checkpoint
        ("simclr_resnet50.toml", [], 25_557_032),  # ResNet-50 with the 1000-class head (torchvision)
        ("simclr_resnet50.toml", ["model.arch=resnet18"], 11_689_512),  # ResNet-18 (torchvision)
    ],
)
def test_published_counts(config, overrides, published):
    cfg = load_config(REPO / "configs" / config, overrides)
    with torch.device("meta"):
        encoder = build_method(cfg).inference_network()
    assert encoder.published_parameter_count() == published
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    assert trainable < published  # the trainable count leaves out fixed tables (and frozen layers)
