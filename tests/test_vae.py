"""KL autoencoder: shapes for f8c4 / f8c16 / f4, diffusers AutoencoderKL weights load by name, and the
GAN's one-optimizer split of gradients, the optional LPIPS term."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pretrain.methods.vae import KLAutoencoderTraining, load_vae
from pretrain.models.vae import build_vae, level_channels
from pretrain.models.vae_loading import load_diffusers_vae

from tiny import lpips_files


@pytest.mark.parametrize("downsample,latent_channels", [(8, 4), (8, 16), (4, 4)])
def test_encode_decode_shapes(downsample, latent_channels):
    vae = build_vae(3, latent_channels, downsample, base_channels=8, layers_per_block=1, norm_groups=4)
    x = torch.randn(2, 3, 32, 32)
    posterior = vae.encode(x)
    side = 32 // downsample
    assert posterior.mean.shape == posterior.std.shape == (2, latent_channels, side, side)
    assert vae.decode(posterior.sample()).shape == x.shape
    assert posterior.kl().shape == (2,)


def test_sd_channel_layout():
    assert level_channels(128, 8) == (128, 256, 512, 512)
    assert level_channels(128, 4) == (128, 256, 512)


def diffusers_keys(channels: list[int], layers: int, latent: int) -> set[str]:
    """Parameter names of a diffusers AutoencoderKL, written out from its published module layout."""
    keys: set[str] = set()

    def conv(prefix):
        keys.update({f"{prefix}.weight", f"{prefix}.bias"})

    def resnet(prefix, cin, cout):
        for name in ("norm1", "conv1", "norm2", "conv2"):
            conv(f"{prefix}.{name}")
        if cin != cout:
            conv(f"{prefix}.conv_shortcut")

    def mid(prefix, c):
        resnet(f"{prefix}.resnets.0", c, c)
        resnet(f"{prefix}.resnets.1", c, c)
        for name in ("group_norm", "to_q", "to_k", "to_v", "to_out.0"):
            conv(f"{prefix}.attentions.0.{name}")

    conv("encoder.conv_in")
    for i, c in enumerate(channels):
        for j in range(layers):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", channels[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(channels) - 1:
            conv(f"encoder.down_blocks.{i}.downsamplers.0.conv")
    mid("encoder.mid_block", channels[-1])
    conv("encoder.conv_norm_out")
    conv("encoder.conv_out")
    rev = channels[::-1]
    conv("decoder.conv_in")
    mid("decoder.mid_block", rev[0])
    for i, c in enumerate(rev):
        for j in range(layers + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", rev[max(i - 1, 0)] if j == 0 else c, c)
        if i < len(rev) - 1:
            conv(f"decoder.up_blocks.{i}.upsamplers.0.conv")
    conv("decoder.conv_norm_out")
    conv("decoder.conv_out")
    conv("quant_conv")
    conv("post_quant_conv")
    return keys


def write_diffusers_vae(directory, channels, layers, latent, legacy_attention=False):
    """A small AutoencoderKL in diffusers' on-disk format, with random weights; returns those weights."""
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0",
        "act_fn": "silu",
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": latent,
        "layers_per_block": layers,
        "norm_num_groups": 4,
        "sample_size": 32,
        "scaling_factor": 0.18215,
    }
    reference = build_vae(3, latent, block_out_channels=channels, layers_per_block=layers, norm_groups=4)
    torch.manual_seed(0)
    state = {k: torch.randn_like(v) * 0.1 for k, v in reference.state_dict().items()}
    assert set(state) == diffusers_keys(channels, layers, latent)  # our names are diffusers' names
    on_disk = dict(state)
    if legacy_attention:  # older diffusers files: query/key/value/proj_attn as 1x1 convs
        for name in list(on_disk):
            for old, new in {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}.items():
                if f".attentions.0.{new}." in name:
                    tensor = on_disk.pop(name)
                    on_disk[name.replace(new, old)] = tensor[:, :, None, None] if tensor.dim() == 2 else tensor
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in on_disk.items()}, directory / "diffusion_pytorch_model.safetensors")
    return state


@pytest.mark.parametrize("legacy", [False, True], ids=["current-names", "legacy-attention-names"])
def test_diffusers_autoencoder_weights_load(tmp_path, legacy):
    state = write_diffusers_vae(tmp_path / "vae", [8, 16], layers=1, latent=4, legacy_attention=legacy)
    model, config = load_diffusers_vae(tmp_path / "vae")
    assert config["scaling_factor"] == 0.18215 and model.downsample == 2
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    x = torch.randn(1, 3, 16, 16)
    assert load_vae(tmp_path / "vae").decode(model.encode(x).mean).shape == x.shape


def test_mismatched_diffusers_weights_fail_by_name(tmp_path):
    write_diffusers_vae(tmp_path / "vae", [8, 16], layers=1, latent=4)
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["layers_per_block"] = 2
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="missing"):
        load_diffusers_vae(tmp_path / "vae")


def test_gan_terms_train_only_their_own_network():
    """D's gradient is that of its hinge loss alone; the generator's adversarial term moves only the VAE."""
    torch.manual_seed(0)
    vae = build_vae(3, 4, 2, base_channels=8, layers_per_block=1, norm_groups=4)
    method = KLAutoencoderTraining(vae, gan_weight=0.5, gan_start=0, disc_channels=8, disc_layers=2)
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    method({"image": x})["loss"].backward()
    with_gan = {n: p.grad.clone() for n, p in method.named_parameters()}

    torch.manual_seed(1)  # the same posterior sample
    recon = method.vae(x)[0].detach()
    d = method.discriminator
    hinge = 0.5 * (torch.relu(1 - d(x)).mean() + torch.relu(1 + d(recon)).mean())
    for (name, _), grad in zip(d.named_parameters(), torch.autograd.grad(hinge, list(d.parameters()))):
        assert torch.allclose(with_gan[f"discriminator.{name}"], grad, atol=1e-6), name

    method.zero_grad()
    method.gan_start = 10**6  # before gan_start the VAE gets no adversarial gradient
    torch.manual_seed(1)
    method({"image": x})["loss"].backward()
    assert not torch.allclose(with_gan["vae.decoder.conv_out.weight"], method.vae.decoder.conv_out.weight.grad)
    assert torch.allclose(with_gan["discriminator.net.0.weight"], method.discriminator.net[0].weight.grad)


def test_the_adaptive_gan_weight_is_the_gradient_norm_ratio_at_the_last_layer():
    """VQGAN's eq. 7: |grad nll| / (|grad adv| + 1e-4) at the decoder's last weight, times gan_weight."""
    from torch.func import functional_call

    torch.manual_seed(0)
    vae = build_vae(3, 4, 2, base_channels=8, layers_per_block=1, norm_groups=4)
    method = KLAutoencoderTraining(vae, gan_weight=0.5, disc_channels=8, disc_layers=2, adaptive_gan_weight=True)
    x = torch.randn(2, 3, 16, 16)
    torch.manual_seed(1)
    out = method({"image": x})
    torch.manual_seed(1)  # the same posterior sample
    recon = method.vae(x)[0]
    rec = (recon - x).abs().mean()
    frozen = {n: p.detach() for n, p in method.discriminator.named_parameters()}
    adv = -functional_call(method.discriminator, frozen, (recon,)).mean()
    last = method.vae.decoder.conv_out.weight
    (g_rec,) = torch.autograd.grad(rec, last, retain_graph=True)
    (g_adv,) = torch.autograd.grad(adv, last)
    expected = 0.5 * g_rec.norm() / (g_adv.norm() + 1e-4)
    torch.testing.assert_close(out["gan_weight"], expected)
    assert float(expected) != 0.5  # not the constant
    disc = out["disc_loss"]
    torch.testing.assert_close(out["loss"], rec + 1e-6 * out["kl"] + disc + expected * adv, rtol=1e-5, atol=1e-6)
    out["loss"].backward()  # the weight is detached: one ordinary backward
    assert last.grad is not None


def test_the_perceptual_term_is_lpips_of_the_reconstruction(tmp_path):
    from pretrain.models.lpips import load_lpips

    vgg, lin = lpips_files(tmp_path)
    torch.manual_seed(0)
    vae = build_vae(3, 4, 2, base_channels=8, layers_per_block=1, norm_groups=4)
    method = KLAutoencoderTraining(vae, kl_weight=1e-3, perceptual=(0.25, str(vgg), str(lin)))
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.manual_seed(1)
    out = method({"image": x})
    torch.manual_seed(1)  # the same posterior sample
    recon = method.vae(x)[0]
    expected = load_lpips(vgg, lin)(recon, x).mean()
    assert float(expected) > 0
    torch.testing.assert_close(out["perceptual_loss"], expected)
    torch.testing.assert_close(out["loss"], out["rec_loss"] + 1e-3 * out["kl"] + 0.25 * expected)


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.vae.downsample=6", "method.vae.downsample"),
        ("method.vae.recon_loss=l3", "method.vae.recon_loss"),
        ("data.image_size=20", "data.image_size: 20 is not a multiple of method.vae.downsample 8"),
        ("method.vae.base_channels=100", "method.vae.base_channels"),
        ("method.vae.perceptual_weight=-1", "method.vae.perceptual_weight"),
        (
            "method.vae.adaptive_gan_weight=true method.vae.gan_weight=0.5 engine.kind=fsdp",
            "method.vae.adaptive_gan_weight: the gradient-norm ratio",
        ),
    ],
)
def test_bad_vae_settings_name_the_key(override, key):
    from pretrain.config import ConfigError
    from pretrain.recipes import load_config

    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method.name=vae", "data.image_size=32", "model.patch_size=4", *override.split()])
