"""Gated PixelCNN: exact causality (raster order, then R -> G -> B within a pixel) and no blind spot, for both
likelihood heads and with class labels; the likelihoods against hand computations; the cropped sampler
against full recomputation, sample for sample."""

from __future__ import annotations

import math
import time

import pytest
import torch

from pretrain.models.pixel_likelihood import (
    bits_per_dim,
    categorical_nll,
    logistic_mixture_log_prob,
    logistic_mixture_nll,
    sample_categorical,
    sample_logistic_mixture,
)
from pretrain.models.pixelcnn import MaskedConv2d, PixelCNN

C, H, W = 3, 8, 8


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(likelihood="categorical", num_classes=0, layers=3, kernel_size=3, first_kernel_size=5, hidden=24):
    torch.manual_seed(0)
    return PixelCNN(C, hidden, layers, kernel_size, first_kernel_size, num_classes, likelihood, n_mix=4).eval()


def raster_before(r: int, c: int, r2: int, c2: int) -> bool:
    return (r2, c2) < (r, c)


# --------------------------------------------------------------------------------------------- MaskedConv2d


@pytest.mark.parametrize("mask_type", ["A", "B"])
@pytest.mark.parametrize("kernel,center", [((5, 5), None), ((1, 3), (0, 2)), ((1, 1), None)])
def test_masked_conv_sees_only_the_past_and_allowed_groups(mask_type, kernel, center):
    torch.manual_seed(0)
    groups, cin, cout, side = 3, 6, 9, 6
    conv = MaskedConv2d(cin, cout, kernel, mask_type, groups, center=center)
    ci, cj = conv.center
    x = torch.randn(1, cin, side, side, requires_grad=True)
    out = conv(x)
    assert out.shape == (1, cout, side, side)
    for r in range(side):
        for c in range(side):
            for g in range(groups):
                (grad,) = torch.autograd.grad(out[0, g * 3 : (g + 1) * 3, r, c].sum(), x, retain_graph=True)
                expected = torch.zeros(cin, side, side, dtype=torch.bool)
                for r2 in range(max(0, r - ci), min(side, r - ci + kernel[0])):
                    for c2 in range(max(0, c - cj), min(side, c - cj + kernel[1])):
                        if raster_before(r, c, r2, c2):
                            expected[:, r2, c2] = True
                allowed = g + (mask_type == "B")  # input groups [0, allowed) at the current pixel
                expected[: 2 * allowed, r, c] = True
                assert torch.equal(grad[0] != 0, expected), (r, c, g)
    if mask_type == "A":  # group 0 under mask A sees nothing of the current pixel, and a 1x1 conv nothing else
        assert torch.equal(conv.mask[:3, :, ci, cj], torch.zeros(3, cin))


def test_masked_conv_mask_is_not_checkpointed_and_survives_weight_updates():
    conv = MaskedConv2d(3, 6, 3, "A", 3)
    assert "mask" not in conv.state_dict()
    with torch.no_grad():
        conv.weight.fill_(1.0)  # an optimizer step or a loaded checkpoint may touch masked taps
    x = torch.zeros(1, 3, 3, 3)
    x[0, :, 1, 2] = 1.0  # a later pixel
    assert conv(x)[0, :, 1, 1].sub(conv.bias).abs().max() == 0


# ------------------------------------------------------------------------------------ network dependencies


def dependencies(model: PixelCNN, labels: torch.Tensor | None) -> torch.Tensor:
    """[H, W, C(out group), C(in), H, W] bool: which inputs the output group at each pixel has a nonzero
    gradient for. One batch element per output pixel, one backward per channel group."""
    torch.manual_seed(1)
    x = (torch.rand(1, C, H, W) * 2 - 1).expand(H * W, -1, -1, -1).clone().requires_grad_(True)
    batch_labels = None if labels is None else labels[:1].expand(H * W)
    out = model.forward_scaled(x, batch_labels)  # [HW, C, K, H, W]
    weights = torch.randn(out.shape[2])
    rows, cols = torch.arange(H).repeat_interleave(W), torch.arange(W).repeat(H)
    found = torch.zeros(H, W, C, C, H, W, dtype=torch.bool)
    for group in range(C):
        picked = out[torch.arange(H * W), group, :, rows, cols]  # [HW, K]
        (grad,) = torch.autograd.grad((picked * weights).sum(), x, retain_graph=True)
        found[:, :, group] = (grad != 0).view(H, W, C, H, W)
    return found


def expected_dependencies(reach: int) -> torch.Tensor:
    """The receptive field: channels < c of the pixel itself, `reach` pixels to its left in its row, and
    reach + 1 rows above it spanning `reach` columns on either side."""
    expected = torch.zeros(H, W, C, C, H, W, dtype=torch.bool)
    for r in range(H):
        for c in range(W):
            for group in range(C):
                expected[r, c, group, :group, r, c] = True
                expected[r, c, group, :, r, max(0, c - reach) : c] = True
                expected[r, c, group, :, max(0, r - reach - 1) : r, max(0, c - reach) : c + reach + 1] = True
    return expected


@pytest.mark.parametrize("likelihood", ["categorical", "logistic_mixture"])
@pytest.mark.parametrize("num_classes", [0, 5])
def test_network_is_causal_with_the_expected_receptive_field(likelihood, num_classes):
    model = tiny(likelihood, num_classes)  # reach 2 + 2 * 1 = 4 on an 8x8 image: the edges of the field show
    assert model.receptive_field == 4
    labels = torch.tensor([3]) if num_classes else None
    found = dependencies(model, labels)
    expected = expected_dependencies(model.receptive_field)
    for r in range(H):
        for c in range(W):
            for group in range(C):
                seen = found[r, c, group]
                assert not seen[:, r, c + 1 :].any() and not seen[:, r + 1 :].any(), f"sees the future: {r, c}"
                assert not seen[group:, r, c].any(), f"pixel {r, c} group {group} sees its own or later channels"
                assert seen[:group, r, c].all(), f"pixel {r, c} group {group} misses its earlier channels"
                assert torch.equal(seen, expected[r, c, group]), f"receptive field of pixel {r, c} group {group}"


@pytest.mark.parametrize("likelihood", ["categorical", "logistic_mixture"])
def test_no_blind_spot_the_last_pixel_sees_every_earlier_pixel(likelihood):
    model = tiny(likelihood, layers=3, kernel_size=5, first_kernel_size=7)  # reach 3 + 2 * 2 = 7
    assert model.receptive_field == 7
    found = dependencies(model, None)
    last = found[H - 1, W - 1, 0]  # the red channel of the last pixel
    earlier = torch.ones(H, W, dtype=torch.bool)
    earlier[H - 1, W - 1] = False
    assert torch.equal(last.all(dim=0), earlier)
    assert not last[:, H - 1, W - 1].any()
    assert torch.equal(found, expected_dependencies(7))


def test_output_shapes_and_integer_input():
    x = torch.randint(0, 256, (2, C, H, W), dtype=torch.uint8)
    assert tiny("categorical")(x).shape == (2, C, 256, H, W)
    mixture = tiny("logistic_mixture")
    out = mixture(x)
    assert out.shape == (2, C, 3 * 4, H, W)
    assert torch.equal(out, mixture(x.long()))
    assert mixture.nll(out, x).shape == (2,)
    with pytest.raises(TypeError, match="integer pixels"):
        mixture(x.float())


def test_every_parameter_gets_a_gradient():
    model = tiny("logistic_mixture", num_classes=3)
    x = torch.randint(0, 256, (2, C, H, W))
    model.nll(model(x, torch.tensor([0, 2])), x).sum().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_class_labels_change_the_output():
    model = tiny("categorical", num_classes=4)
    x = torch.randint(0, 256, (1, C, H, W))
    a, b = model(x, torch.tensor([0])), model(x, torch.tensor([1]))
    assert (a - b).abs().max() > 1e-3
    assert torch.equal(a, model(x, torch.tensor([0])))
    with pytest.raises(ValueError, match="pass labels"):
        model(x)
    with pytest.raises(ValueError, match="unconditional"):
        tiny("categorical")(x, torch.tensor([0]))


def test_meta_device_build_then_init_weights_restores_the_masks():
    with torch.device("meta"):
        model = PixelCNN(C, 12, 2, 3, 5)
    model.to_empty(device="cpu")
    model.init_weights()
    reference = PixelCNN(C, 12, 2, 3, 5)
    for (name, built), (_, ref) in zip(model.named_buffers(), reference.named_buffers(), strict=True):
        assert torch.equal(built, ref), name


# ------------------------------------------------------------------------------------------- likelihoods


def test_categorical_nll_matches_a_hand_computed_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 256, 2, 2, dtype=torch.float64) * 3
    x = torch.randint(0, 256, (2, 3, 2, 2))
    x[0, 0, 0, 0], x[1, 2, 1, 1] = 0, 255
    for b in range(2):
        total = 0.0
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    column = logits[b, c, :, i, j].tolist()
                    total -= column[x[b, c, i, j]] - math.log(sum(math.exp(v) for v in column))
        assert categorical_nll(logits, x)[b].item() == pytest.approx(total, rel=1e-12)


def sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def hand_mixture_prob(params: list[list[float]], value: int) -> float:
    """params: [weight logits, means, log-scales], each a list over components."""
    logits, means, log_scales = params
    norm = sum(math.exp(v) for v in logits)
    total = 0.0
    for logit, mean, log_scale in zip(logits, means, log_scales):
        s, centre = math.exp(log_scale), value / 127.5 - 1.0
        upper = sigmoid((centre + 1 / 255 - mean) / s)
        lower = sigmoid((centre - 1 / 255 - mean) / s)
        prob = upper if value == 0 else (1.0 - lower if value == 255 else upper - lower)
        total += math.exp(logit) / norm * prob
    return total


def test_logistic_mixture_nll_matches_hand_computed_cdf_differences():
    torch.manual_seed(0)
    n_mix = 3
    params = torch.randn(2, 3, 3 * n_mix, 2, 2, dtype=torch.float64)
    params[:, :, n_mix : 2 * n_mix] *= 0.7  # means around [-1, 1]
    params[:, :, 2 * n_mix :] = params[:, :, 2 * n_mix :].clamp(-3, 0)  # scales above the -7 floor
    x = torch.randint(1, 255, (2, 3, 2, 2))
    x[0, 0, 0, 0], x[0, 1, 1, 0], x[1, 2, 1, 1], x[1, 0, 0, 1] = 0, 0, 255, 255  # both edges
    nll = logistic_mixture_nll(params, x, n_mix)
    for b in range(2):
        total = 0.0
        for c in range(3):
            for i in range(2):
                for j in range(2):
                    p = params[b, c, :, i, j].tolist()
                    blocks = [p[:n_mix], p[n_mix : 2 * n_mix], p[2 * n_mix :]]
                    total -= math.log(hand_mixture_prob(blocks, int(x[b, c, i, j])))
        assert nll[b].item() == pytest.approx(total, rel=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_discretized_mixture_probabilities_sum_to_one(seed):
    torch.manual_seed(seed)
    n_mix = 5
    params = torch.randn(1, 1, 3 * n_mix, 1, 1, dtype=torch.float64) * 2
    params[0, 0, 2 * n_mix] = -7.0  # one very narrow component
    params[0, 0, 2 * n_mix + 1] = 3.0  # one very wide one
    params[0, 0, n_mix] = 1.5  # a mean beyond the pixel range
    values = torch.arange(256).view(256, 1, 1, 1)
    probs = logistic_mixture_log_prob(params.expand(256, -1, -1, -1, -1), values, n_mix).exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-10)
    assert (probs > 0).all()


def test_logistic_mixture_is_finite_far_in_the_tails():
    """A component at the -7 log-scale floor far from x, and one so wide that its bin width (2/255) / s is
    below float32's range: log-probabilities and gradients stay finite, and the wide one is a flat density."""
    x = torch.tensor([0, 1, 128, 254, 255]).view(1, 1, 1, 5)
    narrow = torch.tensor([0.0, -1.0, -7.0]).view(1, 1, 3, 1, 1).repeat(1, 1, 1, 1, 5).requires_grad_(True)
    wide = torch.tensor([0.0, 1.0, 90.0]).view(1, 1, 3, 1, 1).repeat(1, 1, 1, 1, 5).requires_grad_(True)
    for params in narrow, wide:
        log_prob = logistic_mixture_log_prob(params, x, 1)
        log_prob.sum().backward()
        assert torch.isfinite(log_prob).all() and torch.isfinite(params.grad).all()
    far = (128 / 127.5 - 1 / 255) * math.exp(7.0)  # x = 128 sits this many scales above the bin's lower edge
    assert logistic_mixture_log_prob(narrow, x, 1)[0, 0, 0, 2].item() == pytest.approx(-far, rel=1e-5)
    flat = logistic_mixture_log_prob(wide, x, 1)[0, 0, 0]
    assert flat[0].item() == pytest.approx(math.log(0.5)) and flat[4].item() == pytest.approx(math.log(0.5))
    density = math.log(2 / 255) - 90.0 - math.log(4.0)  # bin width x the logistic's peak density 1 / (4 s)
    assert flat[1:4].tolist() == pytest.approx([density] * 3, rel=1e-6)


def test_bits_per_dim_by_hand_and_uniform_model_is_eight_bits():
    nll = torch.tensor([100.0, 250.0])
    assert torch.allclose(bits_per_dim(nll, 48), nll / (48 * math.log(2)))
    assert bits_per_dim(nll, 48)[0].item() == pytest.approx(100 / (48 * 0.6931471805599453), rel=1e-6)
    x = torch.randint(0, 256, (2, C, H, W))
    uniform = bits_per_dim(categorical_nll(torch.zeros(2, C, 256, H, W), x), C * H * W)
    assert torch.allclose(uniform, torch.full((2,), 8.0), rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------------------------- sampling


def histogram(samples: torch.Tensor) -> torch.Tensor:
    return torch.bincount(samples.flatten(), minlength=256).double() / samples.numel()


def test_samplers_follow_their_distributions():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(256) * 2
    draws = sample_categorical(logits.view(1, 1, 256, 1, 1).expand(50_000, -1, -1, -1, -1), generator)
    assert 0.5 * (histogram(draws) - logits.double().softmax(0)).abs().sum() < 0.03

    # a component narrower than a pixel step (rounding to the wrong bin shows), and mass in both end bins
    params = torch.tensor([0.0, 1.0, -0.5, 0.1, -0.97, 0.96, -5.0, -2.5, -3.0]).view(1, 1, 9, 1, 1)
    draws = sample_logistic_mixture(params.expand(200_000, -1, -1, -1, -1), 3, generator)
    probs = logistic_mixture_log_prob(params.expand(256, -1, -1, -1, -1), torch.arange(256).view(256, 1, 1, 1), 3)
    assert 0.5 * (histogram(draws) - probs.exp().flatten().double()).abs().sum() < 0.02
    assert draws.min() >= 0 and draws.max() <= 255 and draws.dtype == torch.int64


def test_cropped_outputs_equal_the_full_forward():
    model = tiny("logistic_mixture", num_classes=3)
    x = torch.randint(0, 256, (2, C, H, W))
    labels = torch.tensor([0, 2])
    full = model(x, labels)
    for r in range(H):
        links = model.row_links(x, r, labels)
        for c in range(W):
            torch.testing.assert_close(model.pixel_output(x, r, c, links, labels), full[..., r : r + 1, c : c + 1])


def naive_sample(model, num, labels, generator):
    """Recompute the whole image at every position."""
    x = torch.zeros(num, C, H, W, dtype=torch.long)
    for r in range(H):
        for c in range(W):
            for channel in range(C):
                output = model(x, labels)[..., r : r + 1, c : c + 1]
                x[:, channel, r, c] = model.sample_pixels(output, generator)[:, channel, 0, 0]
    return x


def row_cropped_sample(model, num, labels, generator):
    """Only the rows up to the current one: x[:, :, : r + 1]."""
    x = torch.zeros(num, C, H, W, dtype=torch.long)
    for r in range(H):
        for c in range(W):
            for channel in range(C):
                output = model(x[:, :, : r + 1], labels)[..., r : r + 1, c : c + 1]
                x[:, channel, r, c] = model.sample_pixels(output, generator)[:, channel, 0, 0]
    return x


@pytest.mark.parametrize("likelihood,num_classes", [("categorical", 0), ("logistic_mixture", 4)])
def test_sampler_equals_full_recomputation_sample_for_sample(likelihood, num_classes):
    model = tiny(likelihood, num_classes)
    num = 16
    labels = torch.arange(num) % num_classes if num_classes else None
    with torch.no_grad():
        started = time.perf_counter()
        naive = naive_sample(model, num, labels, torch.Generator().manual_seed(7))
        naive_s = time.perf_counter() - started
        started = time.perf_counter()
        rows = row_cropped_sample(model, num, labels, torch.Generator().manual_seed(7))
        rows_s = time.perf_counter() - started
    started = time.perf_counter()
    fast = model.sample(num, labels, torch.Generator().manual_seed(7), shape=(C, H, W))
    fast_s = time.perf_counter() - started
    print(
        f"\n{likelihood}: sampling {num}x{C}x{H}x{W}, full recomputation {naive_s:.3f}s, rows <= r only "
        f"{rows_s:.3f}s ({naive_s / rows_s:.2f}x), PixelCNN.sample {fast_s:.3f}s ({naive_s / fast_s:.2f}x)"
    )
    assert torch.equal(fast, naive)
    assert torch.equal(rows, naive)
    assert fast.dtype == torch.int64 and fast.min() >= 0 and fast.max() <= 255
    assert len(torch.unique(fast)) > 10  # not a constant image


def test_same_seed_same_samples_other_seed_other_samples():
    model = tiny("categorical", num_classes=2)
    labels = torch.tensor([1, 0])
    a = model.sample(2, labels, torch.Generator().manual_seed(3), shape=(C, H, W))
    b = model.sample(2, labels, torch.Generator().manual_seed(3), shape=(C, H, W))
    c = model.sample(2, labels, torch.Generator().manual_seed(4), shape=(C, H, W))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
