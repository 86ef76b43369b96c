"""Training a VQ tokenizer (VQ-VAE, van den Oord et al. 2017; VQGAN, Esser et al. 2021): an autoencoder whose
latents are the nearest codes of a learned codebook (pretrain/models/vq.py, vqvae.py), so an image becomes a
grid of integer tokens that an autoregressive transformer can model.

The loss is reconstruction + the quantizer's (the codebook term and beta x commitment with a straight-through
codebook; beta x commitment alone with an EMA codebook, which moves by its moving averages), plus with
`gan_weight` > 0 the KL-VAE's patch-GAN, wired into the one optimizer as there (pretrain/methods/vae.py: the
discriminator's hinge loss on detached reconstructions, the generator's term through a detached copy of the
discriminator, on from `gan_start`). Dead codes are restarted onto this step's encoder outputs, drawn from
(run seed, step, micro-batch), so every rank draws the same ones and a resumed run draws them again.

With `perceptual_weight` > 0 VQGAN's LPIPS term is added (pretrain/models/lpips.py, weights from local files), and
with `adaptive_gan_weight` the adversarial weight is VQGAN's adaptive one (the ratio of the reconstruction's and
the GAN term's gradient norms at the decoder's last layer, per rank under DDP as in the release).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from data_pipeline.reader import derive_seed
from pretrain.checkpoint import dcp_load, find_checkpoint, read_meta
from pretrain.config import Config, ConfigError, bounded, build_section
from pretrain.diffusion.transforms import pixel_transform, to_unit
from pretrain.methods.base import Method
from pretrain.methods.spec import MethodSpec
from pretrain.methods.vae import (
    PatchDiscriminator,
    PerceptualLoss,
    add_patch_gan,
    check_adaptive_gan,
    check_perceptual,
    reconstruction_loss,
)
from pretrain.models.vqvae import VQAutoencoder, build_vq_autoencoder
from pretrain.visualize import image_grid


@dataclass
class VQConfig:
    """method.vq: VQGAN's f16 tokenizer with a 1,024-code codebook by default, on the KL-VAE's conv layout."""

    in_channels: int = bounded(3, gt=0)
    # Spatial factor, a power of 2: an image of side S becomes S / downsample x S / downsample tokens.
    downsample: int = bounded(16, gt=0)
    # Level i has base_channels * min(2^i, 4) channels (the KL-VAE's rule), or base_channels * channel_mult[i]
    # (VQGAN's ch_mult; log2(downsample) + 1 entries).
    base_channels: int = bounded(128, gt=0)
    channel_mult: tuple[int, ...] = ()
    layers_per_block: int = bounded(2, gt=0)
    norm_groups: int = bounded(32, gt=0)
    # The encoder's output maps before the 1x1 projection to code_dim (VQGAN's z_channels).
    latent_channels: int = bounded(256, gt=0)
    num_codes: int = bounded(1024, gt=0)
    code_dim: int = bounded(256, gt=0)
    # ema: codes are moving averages of their assigned encoder outputs (VQ-VAE appendix A.1) | straight_through:
    # codes learn by gradient, with the codebook loss.
    codebook_update: Literal["ema", "straight_through"] = "ema"
    beta: float = bounded(0.25, ge=0)
    ema_decay: float = bounded(0.99, ge=0, lt=1)
    # A code whose moving usage (assignments per step) falls below this is moved onto an encoder output; 0: never.
    dead_code_threshold: float = bounded(1.0, ge=0)
    # Look codes up by cosine similarity (encoder outputs and codes L2-normalized).
    l2_normalize: bool = False
    recon_loss: Literal["l1", "l2"] = "l1"
    # 0: no discriminator. VQGAN's adversarial weight is adaptive (a ratio of gradient norms); this is a constant.
    gan_weight: float = bounded(0.0, ge=0)
    gan_start: int = bounded(0, ge=0)
    disc_channels: int = bounded(64, gt=0)
    disc_layers: int = bounded(3, gt=0)
    # Multiply gan_weight by VQGAN's adaptive weight (the ratio of the reconstruction's and the adversarial term's
    # gradient norms at the decoder's last layer, eq. 7); off: the constant gan_weight.
    adaptive_gan_weight: bool = False
    # > 0: add this x LPIPS (pretrain/models/lpips.py) to the loss, VQGAN's perceptual term (1.0 there); its
    # weights come from the two local files (the module's docstring says where to get them).
    perceptual_weight: float = bounded(0.0, ge=0)
    lpips_vgg: str = ""
    lpips_lin: str = ""


class VQTokenizerTraining(Method):
    num_visuals = 8

    def __init__(
        self,
        autoencoder: VQAutoencoder,
        recon_loss: str = "l1",
        gan_weight: float = 0.0,
        gan_start: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        seed: int = 0,
        perceptual: tuple[float, str, str] = (0.0, "", ""),
        adaptive_gan_weight: bool = False,
    ) -> None:
        super().__init__()
        self.autoencoder = autoencoder
        self.adaptive_gan_weight = adaptive_gan_weight
        self.perceptual_weight = perceptual[0]
        self.__dict__["perceptual"] = PerceptualLoss(*perceptual[1:]) if perceptual[0] > 0 else None
        self.recon_loss, self.gan_weight, self.gan_start = recon_loss, gan_weight, gan_start
        self.discriminator = (
            PatchDiscriminator(autoencoder.arch.out_channels, disc_channels, disc_layers) if gan_weight > 0 else None
        )
        self.seed = seed
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        # Host-side copies of steps_done and of the micro-batch within the step, for the restart draws (reading
        # the buffer every forward would wait for the device); None until the first forward reads it.
        self._step: int | None = None
        self._micro = 0

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init of every layer and a fresh codebook, e.g. after `to_empty` from meta."""
        self.autoencoder.init_weights()
        if self.discriminator is not None:
            for module in self.discriminator.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        self.steps_done.zero_()
        self._step, self._micro = None, 0

    def inference_network(self) -> VQAutoencoder:
        return self.autoencoder

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return []

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)
        self._step, self._micro = step, 0

    def restart_generator(self, device: torch.device) -> torch.Generator:
        """The same draws on every rank: seeded from (run seed, step, micro-batch), never from the rank."""
        if self._step is None:
            self._step = int(self.steps_done)
        generator = torch.Generator(device=device).manual_seed(derive_seed(self.seed, "vq", self._step, self._micro))
        self._micro += 1
        return generator

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        generator = self.restart_generator(x.device) if self.training else None
        out = self.autoencoder(x, generator)
        recon = out["reconstruction"]
        rec = reconstruction_loss(recon, x, self.recon_loss)
        nll = rec
        metrics = {
            "rec_loss": rec.detach(),
            "vq_loss": out["vq_loss"].detach(),
            "codebook_usage": out["usage"].detach(),
            "codebook_perplexity": out["perplexity"].detach(),
            "codes_restarted": torch.tensor(float(out["restarted"]), device=x.device),
        }
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x)
            nll = nll + self.perceptual_weight * perceptual
            metrics["perceptual_loss"] = perceptual.detach()
        loss = nll + out["vq_loss"]
        if self.discriminator is not None:
            on = (self.steps_done >= self.gan_start).float()
            adaptive = (nll, self.autoencoder.decoder.conv_out.weight) if self.adaptive_gan_weight else None
            loss, gan_metrics = add_patch_gan(loss, self.discriminator, x, recon, on, self.gan_weight, adaptive)
            metrics |= gan_metrics
        return {"loss": loss, **metrics}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: inputs; bottom row: their reconstructions through the tokens."""
        x = batch["image"][: self.num_visuals]
        was_training = self.autoencoder.training
        self.autoencoder.eval()  # no codebook update or restart from a picture
        _, indices, _, _ = self.autoencoder.encode(x)
        recon = self.autoencoder.decode_indices(indices)
        self.autoencoder.train(was_training)
        return {"reconstruction": image_grid(to_unit(torch.cat([x, recon]).float()), nrow=x.shape[0])}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    vq = cfg.method.vq
    if vq.downsample & (vq.downsample - 1):
        raise ConfigError(f"method.vq.downsample: must be a power of 2, got {vq.downsample}")
    if vq.base_channels % vq.norm_groups:
        raise ConfigError(
            f"method.vq.base_channels: {vq.base_channels} is not divisible by method.vq.norm_groups {vq.norm_groups}"
        )
    levels = vq.downsample.bit_length()
    if vq.channel_mult and len(vq.channel_mult) != levels:
        raise ConfigError(
            f"method.vq.channel_mult: {len(vq.channel_mult)} levels, downsample {vq.downsample} needs {levels}"
        )
    if any(m < 1 for m in vq.channel_mult):
        raise ConfigError(f"method.vq.channel_mult: multipliers must be >= 1, got {list(vq.channel_mult)}")
    if cfg.data.image_size % vq.downsample:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} is not a multiple of method.vq.downsample {vq.downsample}"
        )
    check_adaptive_gan(vq, "method.vq", cfg)
    sharded = cfg.engine.kind == "fsdp" or (cfg.engine.kind == "deepspeed" and cfg.engine.deepspeed.zero_stage == 3)
    if sharded and vq.codebook_update == "straight_through" and vq.dead_code_threshold > 0:
        raise ConfigError(
            "method.vq.dead_code_threshold: a restart writes the straight-through codebook (a parameter) in place, "
            f"which engine.kind={cfg.engine.kind!r} shards and would not keep; use codebook_update = 'ema' (the "
            "codebook is buffers), dead_code_threshold = 0, or engine.kind = 'ddp'"
        )


def build_autoencoder(vq: VQConfig) -> VQAutoencoder:
    return build_vq_autoencoder(
        vq.num_codes,
        vq.code_dim,
        in_channels=vq.in_channels,
        latent_channels=vq.latent_channels,
        downsample=vq.downsample,
        base_channels=vq.base_channels,
        layers_per_block=vq.layers_per_block,
        norm_groups=vq.norm_groups,
        block_out_channels=[vq.base_channels * m for m in vq.channel_mult] or None,
        beta=vq.beta,
        update=vq.codebook_update,
        ema_decay=vq.ema_decay,
        dead_code_threshold=vq.dead_code_threshold,
        l2_normalize=vq.l2_normalize,
    )


def build(cfg: Config) -> VQTokenizerTraining:
    vq = cfg.method.vq
    return VQTokenizerTraining(
        build_autoencoder(vq),
        vq.recon_loss,
        vq.gan_weight,
        vq.gan_start,
        vq.disc_channels,
        vq.disc_layers,
        cfg.run.seed,
        perceptual=(vq.perceptual_weight, vq.lpips_vgg, vq.lpips_lin),
        adaptive_gan_weight=vq.adaptive_gan_weight,
    )


def tokenizer_settings(path: str | Path) -> VQConfig:
    """The `method.vq` section a tokenizer checkpoint (or run directory) was trained with, from its meta.json."""
    checkpoint = find_checkpoint(path)
    method = read_meta(checkpoint)["config"].get("method", {})
    if method.get("name") != "vq":
        raise ValueError(f"{checkpoint}: method {method.get('name')!r} is not a VQ tokenizer (method.name = 'vq')")
    return build_section(VQConfig, method.get("vq", {}), "method.vq.")


def load_tokenizer(path: str | Path) -> VQAutoencoder:
    """The trained autoencoder of a checkpoint (or run directory) of this `vq` method, in eval mode: what
    `pretrain data tokens` encodes images with and the token transformer decodes its samples with. Only the
    autoencoder's tensors are read (not the discriminator's)."""
    autoencoder = build_autoencoder(tokenizer_settings(path))
    state = {f"autoencoder.{name}": tensor for name, tensor in autoencoder.state_dict().items()}
    dcp_load({"model": state}, find_checkpoint(path))  # fills the live tensors in place
    return autoencoder.eval()


def train_transform(cfg: Config):
    return pixel_transform(cfg.data.image_size, cfg.method.vq.in_channels, cfg.data.crop_scale, cfg.data.hflip)


def preflight(cfg: Config) -> None:
    check_perceptual(cfg.method.vq, "method.vq")


SPEC = MethodSpec("vq", VQConfig, build, train_transform, validate=validate, preflight=preflight)
