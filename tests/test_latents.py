"""Latent shards: a VAE run encodes image shards once; the reader returns the stored posteriors (bad
records skipped and counted), the manifest carries the scale, and DiT trains on them in latent space."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from test_dit_training import dit_overrides
from test_vae import write_diffusers_vae

from data_pipeline.loader import ResumableLoader
from data_pipeline.manifest import Manifest
from data_pipeline.reader import ShardStream
from pretrain.diffusion.transforms import latent_transform, pixel_transform
from pretrain.latent_shards import write_latent_shards
from pretrain.methods.vae import load_vae
from pretrain.recipes import load_config
from pretrain.train import Trainer


def identity(x, gen):
    return x


@pytest.fixture(scope="module")
def vae_checkpoint(module_tmp, digit_shards) -> Path:
    """Two steps of the `vae` method (f4, 4 latent channels, with the GAN on) on 16 px digits."""
    out = module_tmp("vae")
    cfg = load_config(
        None,
        [
            f'run.output_dir="{out}"',
            "run.name=vae",
            f'data.shards="{digit_shards}"',
            "data.image_size=16",
            "data.batch_size=8",
            "data.num_workers=0",
            "data.pin_memory=false",
            "data.crop_scale=[1.0, 1.0]",
            "data.hflip=0.0",
            "method.name=vae",
            "method.vae.downsample=4",
            "method.vae.base_channels=8",
            "method.vae.norm_groups=4",
            "method.vae.layers_per_block=1",
            "method.vae.gan_weight=0.1",
            "method.vae.gan_start=1",
            "method.vae.disc_channels=8",
            "method.vae.disc_layers=2",
            "train.steps=2",
            "train.vis_every=2",
            "train.ckpt_every=0",
            "tracking.enabled=false",
        ],
    )
    result = Trainer(cfg).fit()
    assert len(result.losses) == 2 and all(np.isfinite(result.losses))
    return result.checkpoint


@pytest.fixture(scope="module")
def latent_shards(module_tmp, digit_shards, vae_checkpoint) -> Path:
    out = module_tmp("latents")
    write_latent_shards(load_vae(vae_checkpoint), digit_shards, out, vae_name=str(vae_checkpoint), shard_size=256)
    return out


def test_latent_records_round_trip(digit_shards, vae_checkpoint, latent_shards):
    manifest = Manifest.load(latent_shards)
    assert manifest.latent["channels"] == 4 and manifest.latent["size"] == 4 and manifest.latent["downsample"] == 4
    assert manifest.num_samples("train") == Manifest.load(digit_shards).num_samples("train")
    stored = next(iter(ResumableLoader(str(latent_shards), batch_size=4, transform=identity, shuffle_buffer=0)))
    wanted = {key: i for i, key in enumerate(stored["key"])}
    images = torch.zeros(4, 3, 16, 16)
    loader = ResumableLoader(
        str(digit_shards),
        batch_size=256,
        transform=pixel_transform(16, 3, train=False),
        shuffle_buffer=0,
        infinite=False,
    )
    for batch in loader:
        for key, image, label in zip(batch["key"], batch["image"], batch["label"]):
            if key in wanted:
                images[wanted[key]] = image
                assert label == stored["label"][wanted[key]]
    with torch.no_grad():
        posterior = load_vae(vae_checkpoint).encode(images)
    assert stored["image"].shape == (4, 2, 4, 4, 4)
    assert torch.allclose(stored["image"][:, 0], posterior.mean, atol=1e-5)
    assert torch.allclose(stored["image"][:, 1], posterior.std, atol=1e-5)


def test_scale_factor_brings_latents_to_unit_variance(latent_shards):
    scale = Manifest.load(latent_shards).latent["scale_factor"]
    loader = ResumableLoader(str(latent_shards), batch_size=512, transform=latent_transform(scale), infinite=False)
    latents = torch.cat([batch["image"] for batch in loader])
    assert latents.std().item() == pytest.approx(1.0, abs=0.05)


def test_a_corrupt_latent_is_skipped_and_counted(tmp_path):
    shard = tmp_path / "train-000000.tar"
    with tarfile.open(shard, "w") as tar:
        for key, payload in [("a", None), ("b", b"not an npy file"), ("c", None)]:
            if payload is None:
                buf = io.BytesIO()
                np.save(buf, np.ones((2, 1, 2, 2), dtype=np.float32))
                payload = buf.getvalue()
            for ext, data in (("npy", payload), ("cls", b"1")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    stream = ShardStream([str(shard)], batch_size=8, transform=identity, shuffle_buffer=0, infinite=False)
    (batch,) = list(stream)
    assert batch["key"] == ["a", "c"] and batch["stream"]["skipped"] == 1


def test_dit_trains_in_latent_space_and_decodes_samples(tmp_path, latent_shards, vae_checkpoint):
    cfg = load_config(
        None,
        dit_overrides(
            tmp_path,
            latent_shards,
            "method.dit.space=latent",
            "method.dit.in_channels=4",
            "method.dit.input_size=4",
            "method.dit.patch_size=2",
            f'method.dit.vae="{vae_checkpoint}"',
            "train.steps=2",
            "train.vis_every=2",
        ),
    )
    trainer = Trainer(cfg)
    assert trainer.method.latent_scale.item() == pytest.approx(Manifest.load(latent_shards).latent["scale_factor"])
    assert len(trainer.fit().losses) == 2
    pictures = trainer.method.visuals({})
    assert pictures["samples"].shape == (2 + 2 * 18, 2 + 10 * 18, 3)  # decoded to 16 px RGB


def test_latents_command_with_a_diffusers_vae(tmp_path, digit_shards, capsys):
    from pretrain.cli import main

    write_diffusers_vae(tmp_path / "vae", [8, 16], layers=1, latent=4)
    out = tmp_path / "latents"
    args = ["data", "latents", "--vae", str(tmp_path / "vae"), "--shards", str(digit_shards), "--out", str(out)]
    assert main([*args, "--shard-size", "512"]) == 0
    assert "scale_factor" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.latent["size"] == 8 and manifest.latent["vae"] == str(tmp_path / "vae")
    assert manifest.num_samples("test") == Manifest.load(digit_shards).num_samples("test")
    assert main(args) == 2  # an existing dataset is not overwritten without --overwrite
