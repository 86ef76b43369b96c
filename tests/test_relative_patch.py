"""Relative patch location: the pair geometry (gap, jitter, the 8 positions), the chromatic-aberration guards,
the loss against a direct computation, the FLOP count, pictures, and config checks naming the key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.methods.relative_patch import drop_colors, project_out_green_magenta, sample_pairs
from pretrain.recipes import load_config

RELATIVE = [
    "method.name=relative_patch",
    "model.attn_backend=reference",
    "model.size=tiny",
    "model.patch_size=4",
    "data.image_size=16",
    "method.relative_patch.tile_size=4",
    "method.relative_patch.gap=1",
    "method.relative_patch.jitter=0",
    "method.relative_patch.chroma=none",
]
# Label -> (row, col) step of the neighbour from the center.
STEPS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def test_pairs_are_the_center_and_one_of_8_neighbours_across_the_gap():
    torch.manual_seed(0)
    origins, labels = sample_pairs(400, 40, 8, 4, 0)
    assert set(labels.tolist()) == set(range(8))
    # 3 x 8 + 2 x 4 = 32 px centered in 40: the center patch at (16, 16), neighbours 12 px (tile + gap) away.
    assert (origins[:, 0] == 16).all()
    for label, (dr, dc) in enumerate(STEPS):
        where = labels == label
        assert (origins[where, 1] == torch.tensor([16 + 12 * dr, 16 + 12 * dc])).all()

    torch.manual_seed(1)
    jittered, labels = sample_pairs(2000, 40, 8, 4, 2)
    assert jittered.min() >= 2 and (jittered + 8).max() <= 38  # within the layout's jitter room
    center_offsets = jittered[:, 0] - 16
    assert set(center_offsets.unique().tolist()) == {-2, -1, 0, 1, 2}
    steps = torch.tensor(STEPS)[labels]
    between = jittered[:, 1] - jittered[:, 0] - 12 * steps  # the two patches' jitters, independent
    assert set(between.unique().tolist()) == set(range(-4, 5))
    # With a jitter below the gap the patches never touch: the gap between them is 4 +- 4 px >= 0.
    edge = (jittered[:, 1] - jittered[:, 0]).abs()
    assert ((edge >= 8) | (steps == 0)).all()


def test_projection_removes_green_magenta_and_keeps_grays():
    colors = torch.rand(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    projected = project_out_green_magenta(colors)
    axis = torch.tensor([-1.0, 2.0, -1.0]) / 6**0.5
    torch.testing.assert_close(torch.einsum("nchw,c->nhw", projected, axis), torch.zeros(5, 4, 4), atol=1e-6, rtol=0)
    # What is left is the rest: projecting twice changes nothing, and red - blue is untouched.
    torch.testing.assert_close(project_out_green_magenta(projected), projected)
    torch.testing.assert_close(projected[:, 0] - projected[:, 2], colors[:, 0] - colors[:, 2])
    gray = torch.rand(2, 1, 4, 4).expand(-1, 3, -1, -1)
    torch.testing.assert_close(project_out_green_magenta(gray), gray)


def test_color_dropping_keeps_one_channel_and_noise_of_a_hundredth_of_its_std():
    tiles = torch.randn(300, 2, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 3 + 1
    dropped = drop_colors(tiles, torch.Generator().manual_seed(1))
    flat, source = dropped.reshape(-1, 3, 8, 8), tiles.reshape(-1, 3, 8, 8)
    kept = (flat == source).all(dim=(-2, -1))
    assert (kept.sum(dim=1) == 1).all()
    counts = kept.sum(dim=0)
    assert (counts > 150).all()  # each channel kept about a third of the time
    ratio = flat[~kept].reshape(-1, 2, 64).std(dim=-1) / source[kept].reshape(-1, 1, 64).std(dim=-1, unbiased=False)
    assert 0.007 < float(ratio.mean()) < 0.013


def test_loss_is_the_cross_entropy_of_the_pair_and_pictures_draw():
    cfg = load_config(None, RELATIVE)
    method = build_method(cfg)
    images = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(3)
    out = method({"image": images})
    torch.manual_seed(3)
    origins, labels = sample_pairs(5, 16, 4, 1, 0)
    center = images[:, :, 6:10, 6:10]
    neighbour = torch.stack(
        [
            images[b, :, 6 + 5 * STEPS[k][0] : 10 + 5 * STEPS[k][0], 6 + 5 * STEPS[k][1] : 10 + 5 * STEPS[k][1]]
            for b, k in enumerate(labels.tolist())
        ]
    )
    features = method.backbone.forward_features(torch.stack([center, neighbour], 1).flatten(0, 1), "mean")
    logits = method.head(features.reshape(5, -1))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    picture = method.visuals({"image": images})["relative_patch"]
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 3


@pytest.mark.parametrize("chroma", ["projection", "drop"])
def test_flop_count_matches_the_counter(chroma):
    cfg = load_config(
        None, [*RELATIVE, "method.relative_patch.head_hidden_dim=24", f"method.relative_patch.chroma={chroma}"]
    )
    method = build_method(cfg).train()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    analytic = flops_per_sample(cfg)
    with FlopCounterMode(display=False) as forward:
        method({"image": images})
    assert forward.get_total_flops() / 2 == pytest.approx(analytic["forward"], rel=1e-9)
    with FlopCounterMode(display=False) as train:
        method({"image": images})["loss"].backward()
    assert 0.97 * analytic["train"] <= train.get_total_flops() / 2 <= analytic["train"] * (1 + 1e-9)


def test_bad_settings_fail_naming_the_key_and_sizes():
    with pytest.raises(
        ConfigError,
        match=r"method.relative_patch.tile_size: a 3x3 grid of 4 px tiles with method.relative_patch.gap 2 and "
        r"method.relative_patch.jitter 0 spans 16 px, more than data.image_size 12",
    ):
        load_config(None, [*RELATIVE, "data.image_size=12", "method.relative_patch.gap=2"])
    with pytest.raises(
        ConfigError, match="method.relative_patch.tile_size: 6 px is not a multiple of model.patch_size 4"
    ):
        load_config(None, [*RELATIVE, "method.relative_patch.tile_size=6"])
    with pytest.raises(ConfigError, match="method.relative_patch.chroma: 'gray' is not one of none, projection, drop"):
        load_config(None, [*RELATIVE, "method.relative_patch.chroma=gray"])
