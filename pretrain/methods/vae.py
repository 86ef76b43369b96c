"""Training the KL autoencoder: reconstruction + small-weight KL, and optionally a patch-GAN.

How the GAN fits the one-optimizer loop: the generator (VAE) and the discriminator share the loop's
single AdamW, and one backward gives both their gradients. The total loss is

    rec + kl_weight * KL + [step >= gan_start] * gan_weight * G_adv + D_loss

where D_loss (hinge) sees the reconstruction *detached*, so it trains only the discriminator, and
G_adv = -D(recon) is computed through a copy of the discriminator's parameters that is detached
(`torch.func.functional_call`), so it trains only the VAE. The discriminator learns from step 0; the
generator term switches on at `gan_start`, once reconstructions are reasonable. The step count is a
persistent buffer, so a resumed run switches at the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from pretrain.checkpoint import dcp_load, find_checkpoint, read_meta
from pretrain.config import Config, ConfigError, bounded, build_section
from pretrain.diffusion.transforms import pixel_transform, to_unit
from pretrain.methods.base import Method
from pretrain.methods.spec import MethodSpec
from pretrain.models.lpips import LPIPS, load_lpips
from pretrain.models.vae import AutoencoderKL, build_vae
from pretrain.models.vae_loading import is_diffusers_vae, load_diffusers_vae
from pretrain.visualize import image_grid


@dataclass
class VAEConfig:
    """method.vae: a KL autoencoder in diffusers' AutoencoderKL layout (SD's f8c4 by default)."""

    in_channels: int = bounded(3, gt=0)
    latent_channels: int = bounded(4, gt=0)
    # Spatial factor, a power of 2: log2(downsample) + 1 resolution levels.
    downsample: int = bounded(8, gt=0)
    # Level i has base_channels * min(2^i, 4) channels (SD's 128, 256, 512, 512).
    base_channels: int = bounded(128, gt=0)
    layers_per_block: int = bounded(2, gt=0)
    norm_groups: int = bounded(32, gt=0)
    recon_loss: Literal["l1", "l2"] = "l1"
    kl_weight: float = bounded(1e-6, ge=0)
    # 0: no discriminator.
    gan_weight: float = bounded(0.0, ge=0)
    # Optimizer step from which the generator's adversarial term is on.
    gan_start: int = bounded(0, ge=0)
    disc_channels: int = 64
    disc_layers: int = 3
    # Multiply gan_weight by VQGAN's adaptive weight (the gradient-norm ratio at the decoder's last layer), as LDM's
    # LPIPSWithDiscriminator does; off: the constant gan_weight.
    adaptive_gan_weight: bool = False
    # > 0: add this x LPIPS (pretrain/models/lpips.py) to the loss, as LDM's LPIPSWithDiscriminator does (1.0);
    # its weights come from the two local files (the module's docstring says where to get them).
    perceptual_weight: float = bounded(0.0, ge=0)
    lpips_vgg: str = ""
    lpips_lin: str = ""
    # A diffusers AutoencoderKL directory (config.json + safetensors) to start from.
    pretrained: str = ""


class PatchDiscriminator(nn.Module):
    """Conv stack that scores overlapping patches real (> 0) or fake (< 0); GroupNorm keeps it batch-independent."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3) -> None:
        super().__init__()
        modules: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for _ in range(1, layers):
            modules += [
                nn.Conv2d(width, 2 * width, 4, stride=2, padding=1, bias=False),
                nn.GroupNorm(min(32, 2 * width), 2 * width),
                nn.LeakyReLU(0.2),
            ]
            width *= 2
        modules.append(nn.Conv2d(width, 1, 3, padding=1))
        self.net = nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def adaptive_gan_weight(nll: Tensor, generator_adv: Tensor, last_layer: Tensor) -> Tensor:
    """VQGAN's adaptive adversarial weight (Esser et al. 2021, eq. 7; taming's calculate_adaptive_weight):
    |grad of the reconstruction loss| / (|grad of the adversarial term| + 1e-4) at the decoder's last layer,
    clamped to [0, 1e4] and detached. It balances the two terms' pull on the decoder whatever their scales."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(generator_adv, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (adv_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def add_patch_gan(
    loss: Tensor,
    discriminator: nn.Module,
    images: Tensor,
    recon: Tensor,
    generator_on: Tensor,
    gan_weight: float,
    adaptive: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss + the discriminator's hinge loss + generator_on x gan_weight x the generator's adversarial term,
    their metrics): the discriminator sees the reconstruction detached, the generator's term goes through a
    detached copy of the discriminator's parameters, so one backward trains each player on its own term.
    `adaptive` = (reconstruction loss, the decoder's last weight) multiplies gan_weight by
    `adaptive_gan_weight`, as VQGAN and LDM's autoencoders do."""
    real, fake = discriminator(images), discriminator(recon.detach())
    disc = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
    frozen = {name: p.detach() for name, p in discriminator.named_parameters()}
    generator_adv = -functional_call(discriminator, frozen, (recon,)).mean()
    weight = gan_weight * (adaptive_gan_weight(adaptive[0], generator_adv, adaptive[1]) if adaptive else 1.0)
    loss = loss + disc + generator_on * weight * generator_adv
    metrics = {"disc_loss": disc.detach(), "gen_adv": generator_adv.detach()}
    if adaptive:
        metrics["gan_weight"] = weight.detach()
    return loss, metrics


def check_adaptive_gan(section, key: str, cfg: Config) -> None:
    """The adaptive weight differentiates through the decoder's last weight inside the forward; under FSDP2 or
    ZeRO-3 that weight is a shard gathered by hooks, which this is not verified with."""
    sharded = cfg.engine.kind == "fsdp" or (cfg.engine.kind == "deepspeed" and cfg.engine.deepspeed.zero_stage == 3)
    if section.adaptive_gan_weight and section.gan_weight > 0 and sharded:
        raise ConfigError(
            f"{key}.adaptive_gan_weight: the gradient-norm ratio at the decoder's last layer is computed inside the "
            f"forward, which engine.kind={cfg.engine.kind!r} shards; use a constant weight or engine.kind = 'ddp'"
        )


class PerceptualLoss:
    """Mean LPIPS of reconstructions against their images. The network is loaded from its local files on first
    use and kept outside the method's module tree: frozen, so it is never trained, checkpointed or sharded,
    and each rank holds its own copy on the images' device."""

    def __init__(self, vgg_path: str, lin_path: str) -> None:
        self.vgg_path, self.lin_path = vgg_path, lin_path
        self.network: LPIPS | None = None

    def __call__(self, recon: Tensor, target: Tensor) -> Tensor:
        if self.network is None:
            self.network = load_lpips(self.vgg_path, self.lin_path)
        self.network.to(recon.device)
        return self.network(recon, target).mean()


def check_perceptual(section, key: str) -> None:
    """A perceptual weight names both weight files and they exist: checked before any work, naming the key."""
    if section.perceptual_weight <= 0:
        return
    for name in ("lpips_vgg", "lpips_lin"):
        path = getattr(section, name)
        if not path:
            raise ConfigError(
                f"{key}.{name}: {key}.perceptual_weight > 0 needs the local LPIPS weight files "
                "(pretrain/models/lpips.py says where to get them)"
            )
        if not Path(path).is_file():
            raise ConfigError(f"{key}.{name}: no file {path}")


def reconstruction_loss(recon: Tensor, target: Tensor, kind: str) -> Tensor:
    diff = recon.float() - target.float()
    return diff.abs().mean() if kind == "l1" else diff.pow(2).mean()


class KLAutoencoderTraining(Method):
    def __init__(
        self,
        vae: AutoencoderKL,
        recon_loss: str = "l1",
        kl_weight: float = 1e-6,
        gan_weight: float = 0.0,
        gan_start: int = 0,
        disc_channels: int = 64,
        disc_layers: int = 3,
        num_visuals: int = 8,
        perceptual: tuple[float, str, str] = (0.0, "", ""),
        adaptive_gan_weight: bool = False,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.adaptive_gan_weight = adaptive_gan_weight
        self.perceptual_weight = perceptual[0]
        self.__dict__["perceptual"] = PerceptualLoss(*perceptual[1:]) if perceptual[0] > 0 else None
        self.recon_loss, self.kl_weight = recon_loss, kl_weight
        self.gan_weight, self.gan_start = gan_weight, gan_start
        self.discriminator = (
            PatchDiscriminator(vae.arch.out_channels, disc_channels, disc_layers) if gan_weight > 0 else None
        )
        self.num_visuals = num_visuals
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init of every layer, e.g. after building on the meta device and `to_empty`."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.steps_done.zero_()

    def inference_network(self) -> AutoencoderKL:
        return self.vae

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return []

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(step)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        recon, posterior = self.vae(x)
        rec = reconstruction_loss(recon, x, self.recon_loss)
        kl = posterior.kl().mean()
        nll = rec
        out = {"rec_loss": rec.detach(), "kl": kl.detach()}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, x)
            nll = nll + self.perceptual_weight * perceptual
            out["perceptual_loss"] = perceptual.detach()
        loss = nll + self.kl_weight * kl
        if self.discriminator is not None:
            on = (self.steps_done >= self.gan_start).float()
            adaptive = (nll, self.vae.decoder.conv_out.weight) if self.adaptive_gan_weight else None
            loss, gan_metrics = add_patch_gan(loss, self.discriminator, x, recon, on, self.gan_weight, adaptive)
            out |= gan_metrics
        return {"loss": loss, **out}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: inputs; bottom row: reconstructions from the posterior mean."""
        x = batch["image"][: self.num_visuals]
        recon = self.vae.decode(self.vae.encode(x).mean)
        return {"reconstruction": image_grid(to_unit(torch.cat([x, recon]).float()), nrow=x.shape[0])}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    vae = cfg.method.vae
    if vae.downsample & (vae.downsample - 1):
        raise ConfigError(f"method.vae.downsample: must be a power of 2, got {vae.downsample}")
    if vae.base_channels % vae.norm_groups:
        raise ConfigError(
            f"method.vae.base_channels: {vae.base_channels} is not divisible by method.vae.norm_groups {vae.norm_groups}"
        )
    if vae.gan_weight > 0 and (vae.disc_channels < 1 or vae.disc_layers < 1):
        raise ConfigError("method.vae.disc_channels: the discriminator needs disc_channels >= 1 and disc_layers >= 1")
    if cfg.data.image_size % vae.downsample:
        raise ConfigError(
            f"data.image_size: {cfg.data.image_size} is not a multiple of method.vae.downsample {vae.downsample}"
        )
    check_adaptive_gan(vae, "method.vae", cfg)


def build_from_section(v: VAEConfig) -> KLAutoencoderTraining:
    if v.pretrained:
        vae = load_diffusers_vae(v.pretrained)[0].train()
    else:
        vae = build_vae(
            v.in_channels, v.latent_channels, v.downsample, v.base_channels, v.layers_per_block, v.norm_groups
        )
    return KLAutoencoderTraining(
        vae,
        v.recon_loss,
        v.kl_weight,
        v.gan_weight,
        v.gan_start,
        v.disc_channels,
        v.disc_layers,
        perceptual=(v.perceptual_weight, v.lpips_vgg, v.lpips_lin),
        adaptive_gan_weight=v.adaptive_gan_weight,
    )


def build(cfg: Config) -> KLAutoencoderTraining:
    return build_from_section(cfg.method.vae)


def train_transform(cfg: Config):
    return pixel_transform(cfg.data.image_size, cfg.method.vae.in_channels, cfg.data.crop_scale, cfg.data.hflip)


def load_vae(path: str | Path) -> AutoencoderKL:
    """A diffusers AutoencoderKL directory, or a checkpoint (or run directory) of this `vae` method: what
    DiT decodes latents with and `pretrain data latents` encodes images with."""
    if is_diffusers_vae(path):
        return load_diffusers_vae(path)[0]
    checkpoint = find_checkpoint(path)
    config = read_meta(checkpoint)["config"]
    method_name = config.get("method", {}).get("name")
    if method_name != "vae":
        raise ValueError(f"{checkpoint}: method {method_name!r} is not a VAE (and {path} is no diffusers VAE)")
    method = build_from_section(build_section(VAEConfig, config["method"].get("vae", {}), "method.vae."))
    dcp_load({"model": method.state_dict()}, checkpoint)
    return method.vae.eval()


def preflight(cfg: Config) -> None:
    check_perceptual(cfg.method.vae, "method.vae")


SPEC = MethodSpec("vae", VAEConfig, build, train_transform, validate=validate, preflight=preflight)
