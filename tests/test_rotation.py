"""Rotation prediction: the four rotations and their labels, the loss against a direct computation, its
pictures and FLOPs (resume and 2-rank engines: tests/test_pretext.py, shared by the pretext tasks)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.methods.rotation import ROTATIONS, rotate_batch
from pretrain.recipes import load_config

ROTATION = ["method.name=rotation", "model.attn_backend=reference"]


def test_rotations_and_labels_match_direct_indexing():
    images = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    rotated, labels = rotate_batch(images)
    assert rotated.shape == (8, 3, 4, 4) and labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    for i in range(2):
        x = images[i]
        assert torch.equal(rotated[i], x)
        # 90 degrees counter-clockwise: the last column becomes the first row.
        assert torch.equal(rotated[2 + i], x.transpose(1, 2).flip(1))
        assert torch.equal(rotated[4 + i], x.flip(1).flip(2))
        assert torch.equal(rotated[6 + i], x.transpose(1, 2).flip(2))
    # A quarter turn four times is the identity.
    again = rotated[2:4]
    for _ in range(3):
        again = torch.rot90(again, 1, dims=(2, 3))
    assert torch.equal(again, images)


def test_loss_is_the_cross_entropy_over_all_four_rotations():
    cfg = load_config(None, [*ROTATION, "model.size=tiny", "model.patch_size=8", "data.image_size=16"])
    method = build_method(cfg)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = method({"image": images})
    logits = torch.cat(
        [method.head(method.backbone.forward_features(torch.rot90(images, k, (2, 3)), "cls")) for k in range(4)]
    )
    labels = torch.arange(ROTATIONS).repeat_interleave(3)
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    assert out["rotation_accuracy"] == (logits.argmax(-1) == labels).float().mean()
    picture = method.visuals({"image": images})["rotation"]
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 3


@pytest.mark.parametrize("hidden", [0, 24])
def test_flop_count_matches_the_counter(hidden):
    """Forward exactly as FlopCounterMode counts it; training within 3% below 3 x forward (the pixels' gradient)."""
    cfg = load_config(
        None,
        [
            *ROTATION,
            "model.size=tiny",
            "model.patch_size=8",
            "data.image_size=32",
            f"method.rotation.head_hidden_dim={hidden}",
        ],
    )
    method = build_method(cfg).train()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    analytic = flops_per_sample(cfg)
    with FlopCounterMode(display=False) as forward:
        method({"image": images})
    assert forward.get_total_flops() / 2 == pytest.approx(analytic["forward"], rel=1e-9)
    with FlopCounterMode(display=False) as train:
        method({"image": images})["loss"].backward()
    assert 0.97 * analytic["train"] <= train.get_total_flops() / 2 <= analytic["train"] * (1 + 1e-9)


def test_bad_settings_fail_naming_the_key():
    with pytest.raises(ConfigError, match="method.rotation.head_hidden_dim: must be >= 0"):
        load_config(None, [*ROTATION, "method.rotation.head_hidden_dim=-1"])
    with pytest.raises(ConfigError, match="data.local_crops: rotation prediction uses one view"):
        load_config(None, [*ROTATION, "data.local_crops=2"])
