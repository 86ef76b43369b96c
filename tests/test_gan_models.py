"""GAN building blocks: DCGAN and StyleGAN2 networks (shapes, init, conditioning, meta-device init, gradients to
every parameter), the modulated convolution against a per-sample loop, noise and truncation, the minibatch std
layer, and the losses against their formulas written out independently."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pretrain.methods.gan_losses import (
    discriminator_loss,
    generator_nonsaturating_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lazy_r1_weight,
    r1_penalty,
)
from pretrain.models.dcgan import DCGANDiscriminator, DCGANGenerator
from pretrain.models.stylegan import (
    EqualLinear,
    MappingNetwork,
    ModulatedConv2d,
    NoiseInjection,
    StyleGANDiscriminator,
    StyleGANGenerator,
    minibatch_std,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

B, C = 4, 3


def dcgan_g(size=16, classes=0):
    torch.manual_seed(0)
    return DCGANGenerator(latent_dim=8, channels=C, image_size=size, base_channels=4, num_classes=classes)


def dcgan_d(size=16, classes=0):
    torch.manual_seed(0)
    return DCGANDiscriminator(channels=C, image_size=size, base_channels=4, num_classes=classes)


def style_g(size=16, classes=0, channels=C):
    torch.manual_seed(0)
    return StyleGANGenerator(
        latent_dim=8,
        w_dim=8,
        image_size=size,
        channels=channels,
        base_channels=4,
        max_channels=8,
        mapping_layers=2,
        num_classes=classes,
    )


def style_d(size=16, classes=0, group=2):
    torch.manual_seed(0)
    return StyleGANDiscriminator(
        image_size=size, channels=C, base_channels=4, max_channels=8, num_classes=classes, mbstd_group=group
    )


def labels_or_none(classes):
    return torch.arange(B) % classes if classes else None


def set_noise_strength(model, value):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NoiseInjection):
                module.strength.fill_(value)


# ------------------------------------------------------------------------------------------ shapes and sizes


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("classes", [0, 3])
def test_dcgan_shapes_and_range(size, classes):
    g, d = dcgan_g(size, classes), dcgan_d(size, classes)
    y = labels_or_none(classes)
    images = g(torch.randn(B, g.latent_dim), y)
    assert images.shape == (B, C, size, size)
    assert images.abs().max() <= 1 and images.std() > 0
    logits = d(images, y)
    assert logits.shape == (B,) and logits.isfinite().all()


@pytest.mark.parametrize("size", [8, 16])
@pytest.mark.parametrize("classes", [0, 3])
def test_stylegan_shapes(size, classes):
    g, d = style_g(size, classes), style_d(size, classes)
    y = labels_or_none(classes)
    images, ws = g(torch.randn(B, g.latent_dim), y, return_w=True)
    assert images.shape == (B, C, size, size) and images.isfinite().all() and images.std() > 0
    assert g.num_ws == 2 * int(math.log2(size)) - 2 and ws.shape == (B, g.num_ws, g.w_dim)
    logits = d(images, y)
    assert logits.shape == (B,) and logits.isfinite().all()


@pytest.mark.parametrize("size", [0, 4, 12, 24])
@pytest.mark.parametrize(
    "build",
    [
        lambda s: DCGANGenerator(image_size=s),
        lambda s: DCGANDiscriminator(image_size=s),
        lambda s: StyleGANGenerator(image_size=s),
        lambda s: StyleGANDiscriminator(image_size=s),
    ],
)
def test_bad_image_size_raises(build, size):
    with pytest.raises(ValueError, match="image_size"):
        build(size)


def test_labels_must_match_conditioning():
    for g in dcgan_g(8, 0), style_g(8, 0):
        with pytest.raises(ValueError, match="unconditional"):
            g(torch.randn(2, 8), torch.zeros(2, dtype=torch.long))
    for g in dcgan_g(8, 3), style_g(8, 3):
        with pytest.raises(ValueError, match="pass labels"):
            g(torch.randn(2, 8))
    with pytest.raises(ValueError, match="pass labels"):
        dcgan_d(8, 3)(torch.randn(2, C, 8, 8))


def test_dcgan_layout_follows_the_paper():
    """64 px, base 64: G 100 -> 512@4 -> 256@8 -> 128@16 -> 64@32 -> 3@64; D 3 -> 64@32 -> ... -> 512@4 -> 1."""
    with torch.device("meta"):
        g, d = DCGANGenerator(), DCGANDiscriminator()
    g_convs = [m for m in g.modules() if isinstance(m, torch.nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in g_convs] == [
        (100, 512),
        (512, 256),
        (256, 128),
        (128, 64),
        (64, 3),
    ]
    d_convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in d_convs] == [(3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in d.modules()) == 3


# ----------------------------------------------------------------------------------------------------- init


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    g = DCGANGenerator(latent_dim=100, image_size=8, base_channels=64, num_classes=10)
    weight = g.net[0].weight  # 100 x 64 x 4 x 4 = 102400 values
    assert abs(weight.std().item() - 0.02) < 0.001 and abs(weight.mean().item()) < 0.001
    bn = g.net[1]
    assert bn.bias.abs().max() == 0 and abs(bn.weight.mean().item() - 1) < 0.01 and 0.01 < bn.weight.std() < 0.03
    assert abs(g.embed.weight.std().item() - 1) < 0.2  # like z
    assert g.net[-2].bias.abs().max() == 0


def test_equalized_linear_init_and_runtime_scale():
    """Effective weight N(0, 1 / fan_in) at init whatever the lr multiplier; y = x W^T lr / sqrt(in) + b lr."""
    torch.manual_seed(0)
    for lr in 1.0, 0.01:
        layer = EqualLinear(256, 128, bias_init=0.5, lr_multiplier=lr)
        effective = layer.weight * layer.weight_gain
        assert abs(effective.std().item() * math.sqrt(256) - 1) < 0.02
        x = torch.randn(3, 256)
        expected = x @ (layer.weight * lr / 16).T + layer.bias * lr
        torch.testing.assert_close(layer(x), expected)
        torch.testing.assert_close(layer.bias * lr, torch.full((128,), 0.5))


@pytest.mark.parametrize("kind", ["dcgan", "stylegan"])
def test_meta_device_build_then_init_weights(kind):
    """Engines may build on the meta device and materialize: init_weights must set every parameter and buffer."""
    build_g, build_d = (dcgan_g, dcgan_d) if kind == "dcgan" else (style_g, style_d)
    with torch.device("meta"):
        g, d = build_g(16, 3), build_d(16, 3)
    for model in g, d:
        model.to_empty(device="cpu")
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.data.fill_(float("nan"))
        model.init_weights()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            assert tensor.isfinite().all(), name
    torch.manual_seed(1)
    y = torch.arange(B) % 3
    images = g(torch.randn(B, 8), y)
    assert images.isfinite().all() and d(images, y).isfinite().all()


def test_stylegan_init_values():
    g = style_g(8, 3)
    for module in g.modules():
        if isinstance(module, ModulatedConv2d):
            assert (module.affine.bias == 1).all()
        if isinstance(module, NoiseInjection):
            assert (module.strength == 0).all()
    assert (g.mapping.w_avg == 0).all()


# ------------------------------------------------------------------------------------------ modulated conv


@pytest.mark.parametrize("demodulate", [True, False])
@pytest.mark.parametrize("upsample", [False, True])
@pytest.mark.parametrize("kernel", [3, 1])
def test_modulated_conv_matches_per_sample_loop(demodulate, upsample, kernel):
    torch.manual_seed(0)
    conv = ModulatedConv2d(3, 5, kernel, w_dim=6, demodulate=demodulate, upsample=upsample)
    x, w = torch.randn(3, 3, 6, 6), torch.randn(3, 6)
    out = conv(x, w)
    side = 12 if upsample else 6
    assert out.shape == (3, 5, side, side)
    styles = w @ (conv.affine.weight / math.sqrt(6)).T + conv.affine.bias
    for b in range(3):
        weight = conv.weight / math.sqrt(3 * kernel * kernel) * styles[b][None, :, None, None]
        if demodulate:
            weight = weight / torch.sqrt(weight.pow(2).sum(dim=(1, 2, 3), keepdim=True) + 1e-8)
        xb = x[b : b + 1]
        if upsample:
            xb = F.interpolate(xb, scale_factor=2, mode="bilinear", align_corners=False)
        torch.testing.assert_close(out[b : b + 1], F.conv2d(xb, weight, padding=kernel // 2), rtol=1e-5, atol=1e-5)


def test_demodulation_normalizes_effective_weights_and_output_variance():
    torch.manual_seed(0)
    conv = ModulatedConv2d(32, 8, 3, w_dim=6)
    w = torch.randn(2, 6) * 3
    weight = conv.modulated_weight(conv.affine(w))
    torch.testing.assert_close(weight.pow(2).sum(dim=(2, 3, 4)), torch.ones(2, 8))
    out = conv(torch.randn(2, 32, 24, 24), w)[:, :, 1:-1, 1:-1]  # interior: no zero padding in the receptive field
    variance = out.var(dim=(2, 3))
    assert (variance - 1).abs().max() < 0.3, variance
    undemodulated = ModulatedConv2d(32, 8, 3, w_dim=6, demodulate=False)
    undemodulated.load_state_dict(conv.state_dict())
    assert (undemodulated(torch.randn(2, 32, 24, 24), w).var(dim=(2, 3)) - 1).abs().max() > 0.5  # styles ~3x


# ------------------------------------------------------------------------------------------- noise injection


def test_noise_injection_modes():
    torch.manual_seed(0)
    layer = NoiseInjection(4, 8)
    x = torch.randn(2, 4, 8, 8)
    for mode in "random", "const", "none":
        assert torch.equal(layer(x, mode), x)  # strength 0 at init
    with torch.no_grad():
        layer.strength.copy_(torch.tensor([0.5, 1.0, -2.0, 0.0]))
    const = layer(x, "const")
    assert torch.equal(const, layer(x, "const")) and not torch.equal(const, x)
    torch.testing.assert_close(const, x + layer.strength[None, :, None, None] * layer.noise_const)
    first = layer(x, "random", torch.Generator().manual_seed(3))
    assert torch.equal(first, layer(x, "random", torch.Generator().manual_seed(3)))
    assert not torch.equal(first, layer(x, "random", torch.Generator().manual_seed(4)))
    noise = (first - x)[:, 0:1] / 0.5  # one noise image per sample, shared by the channels
    torch.testing.assert_close(first - x, layer.strength[None, :, None, None] * noise)
    assert torch.equal(layer(x, "none"), x)
    explicit = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(layer(x, noise=explicit), x + layer.strength[None, :, None, None] * explicit)
    with pytest.raises(ValueError, match="noise_mode"):
        layer(x, "fixed")


def test_generator_noise_is_controlled():
    g = style_g(16).eval()
    z = torch.randn(2, 8)
    out = g(z, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, g(z, generator=torch.Generator().manual_seed(1)))  # strengths 0: noise has no effect
    set_noise_strength(g, 1.0)
    out = g(z, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, g(z, generator=torch.Generator().manual_seed(0)))
    assert not torch.allclose(out, g(z, generator=torch.Generator().manual_seed(1)))
    assert torch.equal(g(z, noise_mode="const"), g(z, noise_mode="const"))
    assert not torch.allclose(g(z, noise_mode="const"), g(z, noise_mode="none"))


# ----------------------------------------------------------------------------------- mapping and truncation


def test_truncation():
    torch.manual_seed(0)
    mapping = MappingNetwork(8, 6, layers=2).eval()
    with torch.no_grad():
        mapping.w_avg.normal_()
    w = mapping(torch.randn(5, 8))
    assert torch.equal(mapping.truncate(w, 0.0), mapping.w_avg.expand(5, 6))
    assert torch.equal(mapping.truncate(w, 1.0), w)
    torch.testing.assert_close(mapping.truncate(w, 0.5), (w + mapping.w_avg) / 2)


def test_w_avg_moving_average():
    torch.manual_seed(0)
    mapping = MappingNetwork(8, 6, layers=2, num_classes=3)
    z, y = torch.randn(5, 8), torch.arange(5) % 3
    before = mapping.w_avg.clone()
    w = mapping(z, y)  # training mode
    torch.testing.assert_close(mapping.w_avg, before + (1 - 0.995) * (w.detach().mean(0) - before))
    after = mapping.w_avg.clone()
    mapping(z, y, update_w_avg=False)
    mapping.eval()(z, y)
    assert torch.equal(mapping.w_avg, after)


def test_mapping_normalizes_z():
    """Only z's direction matters (2nd-moment normalization)."""
    torch.manual_seed(0)
    mapping = MappingNetwork(8, 6, layers=2).eval()
    z = torch.randn(3, 8)
    torch.testing.assert_close(mapping(z), mapping(5 * z))


def test_generator_truncation_zero_collapses_the_batch():
    g = style_g(8).eval()
    with torch.no_grad():
        g.mapping.w_avg.normal_()
    images, ws = g(torch.randn(3, 8), truncation_psi=0.0, noise_mode="none", return_w=True)
    assert torch.equal(ws, g.mapping.w_avg.expand_as(ws))
    torch.testing.assert_close(images, images[:1].expand_as(images))


def test_style_mixing_and_synthesis():
    g = style_g(16).eval()
    z = torch.randn(B, 8)
    images, ws = g(z, noise_mode="none", return_w=True)
    assert torch.equal(ws, ws[:, :1].expand_as(ws))
    torch.testing.assert_close(g.synthesis(ws, noise_mode="none"), images)
    _, mixed = g(z, noise_mode="none", return_w=True, style_mixing_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(mixed[:, 0], ws[:, 0]) and not torch.allclose(mixed[:, -1], ws[:, -1])
    switch = (mixed != ws[:, :1]).any(dim=(0, 2))  # layers from the second z: a suffix
    assert switch.any() and torch.equal(switch, switch.cummax(0).values)
    with pytest.raises(ValueError, match="ws must be"):
        g.synthesis(ws[:, :-1])


# ------------------------------------------------------------------------------------------ class conditioning


def test_class_conditioning_changes_outputs():
    z, x = torch.randn(2, 8), torch.randn(2, C, 8, 8)
    zeros, ones = torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.long)
    for g in dcgan_g(8, 3).eval(), style_g(8, 3).eval():
        kwargs = {} if isinstance(g, DCGANGenerator) else {"noise_mode": "none"}
        assert not torch.allclose(g(z, zeros, **kwargs), g(z, ones, **kwargs))
    for d in dcgan_d(8, 3).eval(), style_d(8, 3):
        assert not torch.allclose(d(x, zeros), d(x, ones))


def test_projection_terms():
    torch.manual_seed(0)
    x, y = torch.randn(B, C, 16, 16), torch.tensor([2, 0, 1, 2])
    d = dcgan_d(16, 3).eval()
    f = d.features(x)
    expected = F.conv2d(f, d.out.weight, d.out.bias).reshape(B)
    expected = expected + torch.stack([(d.embed.weight[y[b]] * f[b].sum(dim=(1, 2))).sum() for b in range(B)])
    torch.testing.assert_close(d(x, y), expected)
    d = style_d(16, 3)
    h = d.features(x)
    expected = d.out(h)[:, 0] + torch.stack([h[b] @ d.embed.weight[y[b]] / math.sqrt(d.feature_dim) for b in range(B)])
    torch.testing.assert_close(d(x, y), expected)


# ----------------------------------------------------------------------------------------------- minibatch std


def test_minibatch_std_matches_direct_computation():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    out = minibatch_std(x, group_size=4)
    assert out.shape == (8, 4, 4, 4) and torch.equal(out[:, :3], x)
    groups = 2  # strided: sample b is in group b mod 2
    for b in range(8):
        members = x[b % groups :: groups]
        assert members.shape[0] == 4
        std = ((members - members.mean(0)).pow(2).mean(0) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[b, 3], std.expand(4, 4))
    small = minibatch_std(x[:3], group_size=4)  # group = min(4, B) = 3
    torch.testing.assert_close(small[0, 3, 0, 0], x[:3].std(0, unbiased=False).mean())
    with pytest.raises(ValueError, match="not a multiple of the group size 4"):
        minibatch_std(torch.randn(6, 3, 4, 4), group_size=4)
    with pytest.raises(ValueError, match="group size"):
        style_d(8, group=4)(torch.randn(6, C, 8, 8))


# --------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("build", [dcgan_g, dcgan_d, style_g, style_d])
def test_gradients_reach_every_parameter(build):
    model = build(16, 3)
    y = torch.arange(B) % 3
    if build in (dcgan_g, style_g):
        out = model(torch.randn(B, 8), y)
    else:
        out = model(torch.randn(B, C, 16, 16), y)
    (out * torch.randn_like(out)).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------------------ losses


def test_logistic_losses_against_formulas():
    torch.manual_seed(0)
    real, fake = torch.randn(6) * 3, torch.randn(5) * 3
    sigmoid = torch.sigmoid
    torch.testing.assert_close(generator_nonsaturating_loss(fake), -torch.log(sigmoid(fake)).mean())
    torch.testing.assert_close(
        discriminator_loss(real, fake), -torch.log(sigmoid(real)).mean() - torch.log(1 - sigmoid(fake)).mean()
    )
    # finite, with the right gradient, where log(sigmoid) underflows
    far = torch.tensor([-200.0, 200.0], requires_grad=True)
    loss = generator_nonsaturating_loss(far)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(100.0))
    torch.testing.assert_close(far.grad, torch.tensor([-0.5, 0.0]))


def test_hinge_losses():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0])
    torch.testing.assert_close(hinge_discriminator_loss(real, fake), torch.tensor((0 + 0.5 + 2) / 3 + (0 + 1) / 2))
    torch.testing.assert_close(hinge_generator_loss(fake), torch.tensor(1.0))


def test_r1_penalty():
    torch.manual_seed(0)
    a = torch.randn(C, 8, 8, requires_grad=True)
    x = torch.randn(B, C, 8, 8, requires_grad=True)
    penalty = r1_penalty(x, (a * x).sum(dim=(1, 2, 3)))  # linear D(x) = <a, x>: ||grad||^2 = ||a||^2
    torch.testing.assert_close(penalty, a.pow(2).sum())
    penalty.backward()  # create_graph: the penalty's gradient reaches D's parameters
    torch.testing.assert_close(a.grad, 2 * a.detach())
    scale = torch.arange(1.0, B + 1)  # D(x_b) = 0.5 * c_b * ||x_b||^2: grad = c_b x_b
    x = torch.randn(B, C, 8, 8, requires_grad=True)
    penalty = r1_penalty(x, 0.5 * scale * x.pow(2).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(penalty, (scale**2 * x.detach().pow(2).sum(dim=(1, 2, 3))).mean())
    with pytest.raises(ValueError, match="require grad"):
        r1_penalty(x.detach(), x.detach().sum(dim=(1, 2, 3)))
    assert lazy_r1_weight(10.0, 16) == 80.0 and lazy_r1_weight(0.2, 1) == 0.1
    with pytest.raises(ValueError, match="interval"):
        lazy_r1_weight(1.0, 0)


def test_r1_on_a_real_discriminator_matches_finite_differences():
    d = style_d(8).double()
    x = torch.randn(2, C, 8, 8, dtype=torch.double, requires_grad=True)
    penalty = r1_penalty(x, d(x))
    # D's logits: the minibatch std couples samples, so compare against the gradient of the sum, as R1 computes it
    direction = torch.randn_like(x)
    eps = 1e-6
    with torch.no_grad():
        slope = (d(x + eps * direction).sum() - d(x - eps * direction).sum()) / (2 * eps)
    (grad,) = torch.autograd.grad(d(x).sum(), x)
    torch.testing.assert_close(slope, (grad * direction).sum())
    torch.testing.assert_close(penalty, grad.pow(2).flatten(1).sum(1).mean())
