"""The VQ tokenizer on the loop: the loss assembled from its parts, codebook metrics, exact resume with the
codebook's moving averages and dead-code restarts, config errors, and two ranks (DDP, FSDP) equal to one process."""

from __future__ import annotations

import json

import pytest
import torch
from engine_runs import CASES, check_case

from pretrain.config import ConfigError
from pretrain.methods.registry import build_method
from pretrain.methods.vae import reconstruction_loss
from pretrain.recipes import load_config

from tiny import check_resume, lpips_files, tiny_overrides

VQ_TINY = [
    "method.name=vq",
    "method.vq.downsample=4",
    "method.vq.base_channels=8",
    "method.vq.norm_groups=4",
    "method.vq.layers_per_block=1",
    "method.vq.latent_channels=8",
    "method.vq.num_codes=16",
    "method.vq.code_dim=4",
    "method.vq.dead_code_threshold=2.0",
    "data.crop_scale=[1.0, 1.0]",
]


def vq_config(out, shards, *extra: str):
    return load_config(None, tiny_overrides(out, shards, "tracking.enabled=false", *VQ_TINY, *extra))


def test_the_loss_is_reconstruction_plus_the_quantizers():
    overrides = ["method.vq.codebook_update=straight_through", "method.vq.dead_code_threshold=0"]
    cfg = load_config(None, ["data.image_size=16", *VQ_TINY, *overrides])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    out = method({"image": x})
    # A straight-through codebook without restarts is what the step saw: recompute every term directly.
    autoencoder = method.autoencoder
    z = autoencoder.quant_conv(autoencoder.encoder(x))
    rows = z.movedim(1, -1).reshape(-1, z.shape[1])
    codebook = autoencoder.quantizer.codebook()
    nearest = torch.cdist(rows.double(), codebook.double()).argmin(dim=1)
    codes = codebook[nearest].reshape(4, 4, 4, -1).movedim(-1, 1)
    commitment = (z - codes).pow(2).mean()
    torch.testing.assert_close(out["vq_loss"], 1.25 * commitment)  # codebook term + beta x commitment
    recon = autoencoder.decode(codes)
    torch.testing.assert_close(out["loss"], reconstruction_loss(recon, x, "l1") + 1.25 * commitment)
    assert 0 < float(out["codebook_usage"]) <= 1 and 1 <= float(out["codebook_perplexity"]) <= 16


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.vq.downsample=6"], "method.vq.downsample"),
        (["data.image_size=18"], "data.image_size"),
        (
            ["engine.kind=fsdp", "method.vq.codebook_update=straight_through"],
            "method.vq.dead_code_threshold: a restart writes",
        ),
        (
            ["engine.kind=fsdp", "method.vq.gan_weight=0.8", "method.vq.adaptive_gan_weight=true"],
            "method.vq.adaptive_gan_weight: the gradient-norm ratio",
        ),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, ["data.image_size=16", *VQ_TINY, *overrides])
    if "engine.kind=fsdp" in overrides:  # the EMA codebook is buffers: FSDP keeps restarts
        load_config(None, ["data.image_size=16", *VQ_TINY, "engine.kind=fsdp"])


def test_resume_is_bit_identical_with_codebook_averages_and_restarts(tmp_path, digit_shards):
    config = lambda out, *extra: vq_config(out, digit_shards, *extra)  # noqa: E731
    _, _, state = check_resume(config, tmp_path, "model (codebook and its moving averages included)")
    assert any("ema_count" in name for name in state)
    lines = [json.loads(line) for line in (tmp_path / "straight" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert sum(line["codes_restarted"] for line in lines) > 0  # the threshold of 2 restarts codes
    assert all(0 < line["codebook_usage"] <= 1 for line in lines)


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("vq")])
def test_two_ranks_match_one_process(engine_runs, case) -> None:
    """The codebook's moving averages and the dead-code restarts reduce over both ranks."""
    state = check_case(engine_runs, case)
    assert any(name.endswith("quantizer.embedding") for name in state)


def test_the_perceptual_term_is_lpips_from_local_files(tmp_path):
    from pretrain.methods.vq import preflight
    from pretrain.models.lpips import load_lpips

    vgg, lin = lpips_files(tmp_path)
    overrides = ["method.vq.codebook_update=straight_through", "method.vq.dead_code_threshold=0"]
    perceptual = ["method.vq.perceptual_weight=0.5", f'method.vq.lpips_vgg="{vgg}"', f'method.vq.lpips_lin="{lin}"']
    cfg = load_config(None, ["data.image_size=16", *VQ_TINY, *overrides, *perceptual])
    preflight(cfg)
    torch.manual_seed(0)
    method = build_method(cfg).train()
    assert not any("lpips" in name or "perceptual" in name for name in method.state_dict())  # not checkpointed
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    out = method({"image": x})
    recon = method.autoencoder(x)["reconstruction"]  # no codebook update or restart: the same reconstruction
    expected = load_lpips(vgg, lin)(recon, x).mean()
    torch.testing.assert_close(out["perceptual_loss"], expected)
    torch.testing.assert_close(out["loss"], out["rec_loss"] + out["vq_loss"] + 0.5 * expected)

    with pytest.raises(ConfigError, match=r"method\.vq\.lpips_lin: no file"):
        preflight(load_config(None, ["data.image_size=16", *VQ_TINY, *perceptual[:2], 'method.vq.lpips_lin="nosuch"']))
    with pytest.raises(ConfigError, match=r"method\.vq\.lpips_vgg: method\.vq\.perceptual_weight > 0 needs"):
        preflight(load_config(None, ["data.image_size=16", *VQ_TINY, "method.vq.perceptual_weight=1.0"]))
