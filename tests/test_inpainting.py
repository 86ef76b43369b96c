"""Context encoders: the masks, the reconstruction loss restricted to the hole, the encoder blind to the hole,
each loss term moving only its own network in the one backward, the FLOP count, pictures, and config checks."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError
from pretrain.methods.inpainting import center_mask, masked_l2, random_block_mask
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.recipes import load_config

INPAINTING = [
    "method.name=inpainting",
    "model.attn_backend=reference",
    "model.size=tiny",
    "model.patch_size=4",
    "data.image_size=16",
    "method.inpainting.mask_size=8",
    "method.inpainting.disc_channels=8",
    "method.inpainting.disc_layers=2",
]
# The cheap ResNet: ResNet-18 with the small stem (a 2 x 2 feature map of 16 px), a narrow conv decoder.
RESNET = ["model.arch=resnet18", "model.resnet_stem=small", "method.inpainting.conv_decoder_width=16"]
ARCHS = {"vit": [], "resnet18": RESNET}


def test_masks():
    mask = center_mask(2, 16, 6)
    assert mask.shape == (2, 1, 16, 16) and mask.sum() == 2 * 36
    assert mask[0, 0, 5:11, 5:11].all() and mask[0, 0, 4].sum() == 0 and mask[0, 0, :, 11].sum() == 0
    blocks = random_block_mask(500, 16, 3, 4, generator=torch.Generator().manual_seed(0))
    area = blocks.sum(dim=(1, 2, 3))
    assert area.min() >= 16 and area.max() <= 48  # one block at least, three disjoint ones at most
    assert (area < 48).any() and (area == 48).any()  # overlaps happen, and so do disjoint blocks
    coverage = blocks.mean(dim=0)[0]
    assert coverage.min() > 0  # every pixel can be hit, corners included
    # A block is a 4x4 square: each image's mask is a union of such squares (its rows have runs of >= 4).
    one = random_block_mask(1, 16, 1, 4, generator=torch.Generator().manual_seed(1))[0, 0]
    rows, cols = one.nonzero().unbind(1)
    assert rows.max() - rows.min() == 3 and cols.max() - cols.min() == 3 and one.sum() == 16


def test_reconstruction_loss_counts_only_the_hole():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(2, 3, 8, 8, generator=generator)
    prediction = torch.randn(2, 3, 8, 8, generator=generator)
    mask = center_mask(2, 8, 4)
    expected = ((prediction - target)[:, :, 2:6, 2:6] ** 2).mean()
    torch.testing.assert_close(masked_l2(prediction, target, mask), expected)
    # Anything outside the hole does not matter; a perfect hole is a zero loss.
    outside = prediction + 100 * (1 - mask)
    torch.testing.assert_close(masked_l2(outside, target, mask), expected)
    assert masked_l2(target * mask + prediction * (1 - mask), target, mask) == 0


@pytest.mark.parametrize("arch", list(ARCHS))
def test_encoder_is_blind_to_the_hole_and_the_loss_is_the_hole_l2(arch):
    method = build_method(load_config(None, [*INPAINTING, *ARCHS[arch]]))
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    mask = method.draw_mask(images)
    assert method.predict(images, mask).shape == images.shape  # the ResNet's decoder: 2 x 2 -> 16 x 16
    encoder = method.inference_network()  # what kNN and the probe read, and what the engines wrap
    assert encoder is method.backbone and encoder.forward_features(images).shape == (2, encoder.embed_dim)
    assert method.transformer_blocks() == (encoder.stages() if arch == "resnet18" else [encoder.blocks])
    changed = images + 5 * mask * torch.randn_like(images)
    torch.testing.assert_close(method.predict(changed, mask), method.predict(images, mask), rtol=0, atol=0)
    terms = method.losses(images)
    torch.testing.assert_close(terms["rec"], masked_l2(method.predict(images, mask), images, mask))
    picture = method.visuals({"image": images})["inpainting"]
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 3


@pytest.mark.parametrize(("mask", "arch"), [("center", "vit"), ("random_blocks", "vit"), ("center", "resnet18")])
def test_each_term_moves_only_its_own_network(mask, arch):
    cfg = load_config(
        None, [*INPAINTING, *ARCHS[arch], f"method.inpainting.mask={mask}", "method.inpainting.block_size=4"]
    )
    method = build_method(cfg)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    generator_params = [*method.backbone.parameters(), *method.decoder.parameters()]
    disc_params = list(method.discriminator.parameters())
    params = generator_params + disc_params
    torch.manual_seed(0)
    terms = method.losses(images)
    grads = {
        name: torch.autograd.grad(value, params, retain_graph=True, allow_unused=True) for name, value in terms.items()
    }
    split = len(generator_params)

    def moved(gradients):
        return [g is not None and bool(g.abs().sum() > 0) for g in gradients]

    assert not any(moved(grads["disc"][:split])) and all(moved(grads["disc"][split:]))
    assert any(moved(grads["gen_adv"][:split])) and not any(moved(grads["gen_adv"][split:]))
    assert any(moved(grads["rec"][:split])) and not any(moved(grads["rec"][split:]))

    # The loss the loop backpropagates is the weighted sum: 0.999 rec + 0.001 adversarial for the generator,
    # the discriminator's own loss for the discriminator.
    torch.manual_seed(0)
    out = method({"image": images})
    total = torch.autograd.grad(out["loss"], params, allow_unused=True)
    for i, g in enumerate(total):
        expected = 0.999 * grads["rec"][i] + 0.001 * grads["gen_adv"][i] if i < split else grads["disc"][i]
        torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-6)
    assert float(out["gen_adv_loss"]) == pytest.approx(float(terms["gen_adv"].detach()))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_flop_count_matches_the_counter(arch):
    """Forward exactly as FlopCounterMode counts it; training within 1%: 3 x forward of what trains overcounts
    the input gradients nobody needs (pixels, the real region), the frozen discriminator pass's backward to the
    fill is not counted."""
    cfg = load_config(None, [*INPAINTING, *ARCHS[arch], "method.inpainting.decoder_hidden_dim=24"])
    method = build_method(cfg).train()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    analytic = flops_per_sample(cfg)
    with FlopCounterMode(display=False) as forward:
        method({"image": images})
    assert forward.get_total_flops() / 2 == pytest.approx(analytic["forward"], rel=1e-9)
    with FlopCounterMode(display=False) as train:
        method({"image": images})["loss"].backward()
    assert analytic["train"] == pytest.approx(train.get_total_flops() / 2, rel=0.01)


def test_bad_settings_fail_naming_the_key_and_sizes():
    with pytest.raises(
        ConfigError, match="method.inpainting.mask_size: a 16 px hole leaves no context in data.image_size 16"
    ):
        load_config(None, [*INPAINTING, "method.inpainting.mask_size=16"])
    with pytest.raises(
        ConfigError, match="method.inpainting.block_size: a 20 px block does not fit data.image_size 16"
    ):
        load_config(None, [*INPAINTING, "method.inpainting.mask=random_blocks", "method.inpainting.block_size=20"])
    with pytest.raises(
        ConfigError,
        match="method.inpainting.disc_layers: 4 stride-2 layers need a judged region of at least 16 px, the discriminator sees 8 px",
    ):
        load_config(None, [*INPAINTING, "method.inpainting.disc_layers=4"])
    with pytest.raises(ConfigError, match="data.image_size: .* 20 px must be a multiple of its stride 8"):
        load_config(None, [*INPAINTING, *RESNET, "data.image_size=20"])
    with pytest.raises(ConfigError, match="data.image_size: .* a ResNet needs at least 32 px; got 16"):
        load_config(None, [*INPAINTING, *RESNET, "model.resnet_stem=imagenet"])
    with pytest.raises(ConfigError, match="engine.activation_checkpointing"):
        load_config(None, [*INPAINTING, *RESNET, "engine.activation_checkpointing=true"])
