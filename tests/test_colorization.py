"""Colorization: Lab against reference values and its round trip, the ab quantization, the soft encoding, the
rebalancing weights and the annealed mean against their formulas, the prior counted on training shards and
kept in the checkpointed buffers, split-brain's concatenated features, pictures, FLOPs and config checks."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from data_pipeline.lab import lab_to_rgb, rgb_to_lab
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import Sample
from pretrain.config import ConfigError
from pretrain.methods.colorization import (
    annealed_mean,
    count_prior,
    gamut_bins,
    gaussian_smooth_on_grid,
    l_input,
    quantize_ab,
    rebalance_weights,
    soft_encode,
    to_lab,
)
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.recipes import load_config

COLOR = [
    "method.name=colorization",
    "model.attn_backend=reference",
    "model.size=tiny",
    "model.patch_size=4",
    "data.image_size=16",
    "method.colorization.prior_images=0",
    "method.colorization.bins=gamut",
]
# The cheap ResNet: ResNet-18 with the small stem (a 2 x 2 feature map of 16 px), a narrow up-convolution.
RESNET = ["model.arch=resnet18", "model.resnet_stem=small", "method.colorization.conv_decoder_width=16"]

# sRGB -> L*a*b* (D65, 2 degrees) from the standard formulas, as tabulated by common references
# (Bruce Lindbloom's calculator, colormine): pure primaries, white, black and mid-gray 0.5.
REFERENCE = [
    ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),
    ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
    ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
    ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
    ((0.5, 0.5, 0.5), (53.3890, 0.0, 0.0)),
]


def test_lab_reference_values_and_round_trip():
    rgb = torch.tensor([c for c, _ in REFERENCE], dtype=torch.float64).T[:, :, None]  # [3, 6, 1]
    expected = torch.tensor([lab for _, lab in REFERENCE], dtype=torch.float64)
    torch.testing.assert_close(rgb_to_lab(rgb)[:, :, 0].T, expected, atol=1e-3, rtol=0)
    # Batched [B, 3, H, W] round trip, float32 as training runs it.
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert (lab_to_rgb(rgb_to_lab(images)) - images).abs().max() < 1e-4
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, atol=1e-10, rtol=0)


def test_quantization_maps_a_color_to_its_bin_center():
    ab = torch.tensor([[4.9, -4.9], [5.1, -5.1], [-37.0, 82.0], [0.0, 0.0], [104.0, -96.0]])
    expected = torch.tensor([[0.0, 0.0], [10.0, -10.0], [-40.0, 80.0], [0.0, 0.0], [100.0, -100.0]])
    assert torch.equal(quantize_ab(ab, 10), expected)
    # Every in-gamut bin center is its own bin, on the grid, inside the range; red and blue are reached.
    bins = gamut_bins(10, 110)
    assert torch.equal(quantize_ab(bins, 10), bins) and bins.abs().max() <= 110
    assert len(bins) == 261 and len(torch.unique(bins, dim=0)) == len(bins)
    primaries = rgb_to_lab(torch.eye(3)[:, :, None])[1:, :, 0].T  # [3, 2] ab of red, green, blue
    for ab_value in quantize_ab(primaries, 10):
        assert (bins == ab_value).all(dim=1).any()


def test_soft_encoding_is_five_nearest_bins_gaussian():
    bins = gamut_bins(10, 110)
    ab = torch.tensor([[12.0, -33.0], [0.0, 0.0], [-61.5, 47.2]])
    targets = soft_encode(ab.T[None, :, :, None], bins, neighbors=5, sigma=5.0)  # [1, Q, 3, 1]
    assert targets.shape == (1, len(bins), 3, 1)
    for i, point in enumerate(ab):
        row = targets[0, :, i, 0]
        distance = (bins - point).norm(dim=1)
        nearest = distance.argsort()[:5]
        expected = torch.zeros(len(bins))
        expected[nearest] = torch.exp(-(distance[nearest] ** 2) / 50)
        torch.testing.assert_close(row, expected / expected.sum())
        assert (row > 0).sum() == 5 and row.argmax() == distance.argmin()


def test_rebalancing_weights_follow_the_formula():
    bins = gamut_bins(10, 110).double()
    prior = torch.rand(len(bins), generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 4
    prior /= prior.sum()
    smoothed = gaussian_smooth_on_grid(prior, bins, 10, 110, 5.0)
    p_tilde, weights = rebalance_weights(prior, smoothed, 0.5)
    expected = 1 / (0.5 * p_tilde + 0.5 / len(bins))
    torch.testing.assert_close(weights, expected / (p_tilde * expected).sum())
    torch.testing.assert_close((p_tilde * weights).sum(), torch.tensor(1.0, dtype=torch.float64))
    # The smoothing is a normalized 2-D Gaussian of sigma 5 ab units on the grid (neighbours 10 apart).
    one = torch.zeros(len(bins), dtype=torch.float64)
    center = int(((bins - torch.tensor([0.0, 0.0], dtype=torch.float64)).norm(dim=1)).argmin())
    one[center] = 1
    spread = gaussian_smooth_on_grid(one, bins, 10, 110, 5.0)
    g = [math.exp(-((d * 10) ** 2) / 50) for d in range(-2, 3)]
    ratio = g[3] / sum(g)  # one step along a, none along b, over the center's weight
    neighbor = int((bins - torch.tensor([10.0, 0.0], dtype=torch.float64)).norm(dim=1).argmin())
    torch.testing.assert_close(
        spread[neighbor] / spread[center], torch.tensor(ratio / (g[2] / sum(g)), dtype=torch.float64)
    )
    # lambda = 1: uniform weights; a rarer class always weighs more.
    torch.testing.assert_close(rebalance_weights(prior, smoothed, 1.0)[1], torch.ones(len(bins), dtype=torch.float64))
    order = p_tilde.argsort()
    assert (weights[order].diff() <= 1e-9).all()


def test_annealed_mean_limits():
    bins = gamut_bins(10, 110)
    logits = torch.randn(2, len(bins), 3, 3, generator=torch.Generator().manual_seed(0))
    mean = torch.einsum("bqhw,qc->bchw", logits.softmax(dim=1), bins)
    torch.testing.assert_close(annealed_mean(logits, bins, 1.0), mean)
    mode = bins[logits.argmax(dim=1)].permute(0, 3, 1, 2)
    torch.testing.assert_close(annealed_mean(logits, bins, 1e-4), mode)
    # T = 0.38 lies between: sharper than the mean, as the paper's picture decoding.
    z = (logits.log_softmax(dim=1) / 0.38).softmax(dim=1)
    torch.testing.assert_close(annealed_mean(logits, bins, 0.38), torch.einsum("bqhw,qc->bchw", z, bins))


def test_prior_counted_on_training_shards_and_checkpointed(digit_shards):
    bins = gamut_bins(10, 110)
    counts = count_prior(str(digit_shards), "train", 10, bins)
    gray = int(bins.norm(dim=1).argmin())
    assert counts.sum() == 10 * 16 * 16 and counts[gray] == counts.sum()  # the digits are gray: one bin
    cfg = load_config(None, [*COLOR, f'data.shards="{digit_shards}"', "method.colorization.prior_images=10"])
    method = build_method(cfg)
    assert method.prior[gray] == 1 and method.class_weights.argmin() == gray
    torch.testing.assert_close((method.smoothed_prior * method.class_weights).sum(), torch.tensor(1.0))
    state = method.state_dict()
    assert {"bins", "prior", "smoothed_prior", "class_weights"} <= state.keys()
    uniform = build_method(load_config(None, COLOR))  # another prior, overwritten by loading the checkpoint
    assert not torch.equal(uniform.prior, method.prior)
    uniform.load_state_dict(state)
    assert torch.equal(uniform.class_weights, method.class_weights) and torch.equal(uniform.bins, method.bins)
    with pytest.raises(ConfigError, match="method.colorization.prior_images"):
        build_method(load_config(None, [*COLOR, 'data.shards="/tmp/hc-none"', "method.colorization.prior_images=5"]))


@pytest.mark.parametrize(("split_brain", "arch"), [(False, "vit"), (True, "vit"), (True, "resnet18")])
def test_loss_features_pictures_and_flops(split_brain, arch):
    """Either backbone: on the ResNet the heads up-convolve its 1/8 feature map to the 1/4 predictions."""
    resnet = RESNET if arch == "resnet18" else []
    cfg = load_config(None, [*COLOR, *resnet, f"method.colorization.split_brain={str(split_brain).lower()}"])
    method = build_method(cfg)
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)).clamp(-1.5, 1.5)
    lab = to_lab(images, method.encoder.image_mean, method.encoder.image_std)
    assert method.predict_ab_logits(lab).shape == (2, len(method.bins), 4, 4)
    nets = [method.l_net, *([method.ab_net] if split_brain else [])]  # what the engines wrap: blocks or stages
    expected = [b for net in nets for b in (net.stages() if arch == "resnet18" else [net.blocks])]
    assert method.transformer_blocks() == expected
    out = method({"image": images})
    assert torch.isfinite(out["loss"]) and (("l_loss" in out) == split_brain)
    out["loss"].backward()
    assert all(p.grad is not None for p in method.parameters())
    encoder = method.inference_network()
    features = encoder.forward_features(images)
    width = method.l_net.embed_dim
    assert features.shape == (2, width * (2 if split_brain else 1))
    torch.testing.assert_close(features[:, :width], method.l_net.forward_features(rgb_l(method, images)))
    picture = method.visuals({"image": images})["colorization"]
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 3
    assert picture.shape[0] == 3 * 16 + 4 * 2  # three rows: grayscale input, prediction, ground truth
    with FlopCounterMode(display=False) as counter:
        lab = to_lab(images[:1], method.encoder.image_mean, method.encoder.image_std)
        method.predict_ab_logits(lab)
        if split_brain:
            method.predict_l_logits(lab)
    assert flops_per_sample(cfg)["forward"] == pytest.approx(counter.get_total_flops(), rel=0.01)


def rgb_l(method, images):
    return l_input(to_lab(images, method.encoder.image_mean, method.encoder.image_std))


def test_ab_loss_is_rebalanced_cross_entropy():
    method = build_method(load_config(None, COLOR))
    generator = torch.Generator().manual_seed(0)
    method.class_weights.copy_(torch.rand(len(method.bins), generator=generator) + 0.5)
    logits = torch.randn(1, len(method.bins), 2, 2, generator=generator)
    ab = torch.randn(1, 2, 2, 2, generator=generator) * 30
    targets = soft_encode(ab, method.bins)
    per_pixel = -(targets * logits.log_softmax(dim=1)).sum(dim=1)
    nearest = (method.bins[:, None, None, :] - ab[0].permute(1, 2, 0)).norm(dim=-1).flatten(1).argmin(dim=0)
    expected = (per_pixel.flatten() * method.class_weights[nearest]).mean()
    torch.testing.assert_close(method.ab_loss(logits, ab), expected)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.colorization.grid=7", "method.colorization.grid"),
        ("method.colorization.temperature=0", "method.colorization.temperature"),
        ("method.colorization.temperature=-0.5", "method.colorization.temperature"),
        ("method.colorization.downsample=3", "method.colorization.downsample"),
        ("method.colorization.rebalance=1.5", "method.colorization.rebalance"),
        ("model.in_chans=1", "model.in_chans"),
        ("method.colorization.bins=data", "method.colorization.bins: 'data' takes the bins the training pixels"),
        (RESNET + ["method.colorization.downsample=16"], "method.colorization.downsample: .* 16 must divide 8"),
        (RESNET + ["data.image_size=20"], "data.image_size: 20 px is not a multiple of the ResNet's stride 8"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, [*COLOR, *(override if isinstance(override, list) else [override])])


@pytest.fixture(scope="module")
def color_shards(tmp_path_factory):
    """6 train images of 8 x 8 random colors (PNG, lossless), and the RGB arrays they hold."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(6)]
    samples = [Sample(f"img{i}", Image.fromarray(a), 0, "train") for i, a in enumerate(arrays)]
    out = tmp_path_factory.mktemp("colors")
    write_shards(samples, out, shard_size=4)
    return out, arrays


def test_data_bins_are_the_cells_the_training_pixels_occupy(color_shards):
    """bins = "data": the bin set and the prior are a direct count of the first prior_images images' cells."""
    shards, arrays = color_shards
    cfg = load_config(
        None, [*COLOR, f'data.shards="{shards}"', "method.colorization.prior_images=5", "method.colorization.bins=data"]
    )
    method = build_method(cfg)
    # Directly: each pixel of the first 5 images (the 6th is not counted) to its cell, a pixel at a time.
    direct = Counter()
    for array in arrays[:5]:
        lab = rgb_to_lab(torch.from_numpy(array).permute(2, 0, 1).float() / 255)  # as the reader decodes
        for a, b in lab[1:].flatten(1).T.tolist():
            direct[(10.0 * round(a / 10), 10.0 * round(b / 10))] += 1
    assert sorted(direct) == [tuple(b) for b in method.bins.tolist()]  # full_grid order: a major, b minor
    expected = torch.tensor([direct[tuple(b)] for b in method.bins.tolist()], dtype=torch.float64)
    torch.testing.assert_close(method.prior.double(), expected / expected.sum(), rtol=1e-6, atol=0)
    assert len(method.bins) != len(gamut_bins(10, 110)) and method.class_weights.shape == (len(method.bins),)
    # The head has one logit per counted bin, and the FLOP count reads the same set.
    assert method.ab_decoder.out_features == len(method.bins)  # patch 4 at downsample 4: one cell a token
    forward = flops_per_sample(cfg)["forward"]
    gamut = flops_per_sample(load_config(None, [*COLOR, f'data.shards="{shards}"']))["forward"]
    assert forward != gamut
