"""GANs as a method of their own: a generator and a discriminator trained as two players, each with its own
optimizer settings and update ratio (`Method.players`; the loop steps one player at a time).

Networks: DCGAN (Radford et al. 2016, pretrain/models/dcgan.py) or a StyleGAN-style generator and residual
discriminator (Karras et al. 2019, 2020; pretrain/models/stylegan.py). Losses: the non-saturating logistic loss
of Goodfellow et al. 2014 (or the hinge loss), and the R1 penalty on real images (Mescheder et al. 2018), applied
lazily every `r1_interval` discriminator steps with weight gamma / 2 x interval, as StyleGAN2 does. An EMA copy
of the generator draws the samples (its buffers, BatchNorm statistics and StyleGAN's w_avg, are copied from the
generator after each step, as StyleGAN2 does).

Randomness (latents, noise inputs, style mixing) comes from the loop's per-(step, player, micro-batch) seeding,
so a resumed run and any world size draw the same numbers.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from pretrain.config import Config, ConfigError, PlayerSettings, bounded
from pretrain.diffusion.transforms import pixel_transform, to_unit
from pretrain.methods.base import Method, Player
from pretrain.methods.gan_losses import (
    discriminator_loss,
    generator_nonsaturating_loss,
    hinge_discriminator_loss,
    hinge_generator_loss,
    lazy_r1_weight,
    r1_penalty,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.dcgan import DCGANDiscriminator, DCGANGenerator
from pretrain.models.stylegan import StyleGANDiscriminator, StyleGANGenerator
from pretrain.visualize import image_grid


@dataclass
class GANConfig:
    """method.gan: the two networks, the losses, and each player's optimizer settings over [optim]."""

    # dcgan | stylegan
    arch: Literal["dcgan", "stylegan"] = "stylegan"
    channels: int = bounded(3, gt=0)
    latent_dim: int = bounded(512, gt=0)
    # > 0: class-conditional on the data's labels (generator: a label embedding; discriminator: projection).
    num_classes: int = bounded(0, ge=0)
    # DCGAN: the width of the generator's last and the discriminator's first layer. StyleGAN: the width at full
    # resolution, doubling per halving up to max_channels.
    base_channels: int = bounded(64, gt=0)
    max_channels: int = bounded(512, gt=0)
    # StyleGAN only.
    w_dim: int = bounded(512, gt=0)
    mapping_layers: int = bounded(8, gt=0)
    mbstd_group: int = bounded(4, gt=0)
    style_mixing: float = bounded(0.9, ge=0, le=1)
    # nonsaturating: softplus losses (Goodfellow et al. 2014; StyleGAN) | hinge.
    loss: Literal["nonsaturating", "hinge"] = "nonsaturating"
    # R1 weight gamma (0: off), applied every r1_interval discriminator steps with weight gamma / 2 x interval.
    r1_gamma: float = bounded(0.0, ge=0)
    r1_interval: int = bounded(16, gt=0)
    # The sampling copy of the generator: p_ema = m p_ema + (1 - m) p after every step.
    ema_momentum: float = bounded(0.999, ge=0, le=1)
    # Pictures: a grid of samples (rows of classes when conditional) and interpolations between fixed latents.
    vis_samples: int = bounded(8, ge=1)
    vis_interpolations: int = bounded(4, ge=0)
    vis_interpolation_steps: int = bounded(8, ge=2)
    truncation_psi: float = bounded(1.0, ge=0)
    generator: PlayerSettings = field(default_factory=PlayerSettings)
    discriminator: PlayerSettings = field(default_factory=PlayerSettings)


def build_networks(g: GANConfig, image_size: int) -> tuple[nn.Module, nn.Module]:
    if g.arch == "dcgan":
        return (
            DCGANGenerator(g.latent_dim, g.channels, image_size, g.base_channels, g.num_classes),
            DCGANDiscriminator(g.channels, image_size, g.base_channels, g.num_classes),
        )
    return (
        StyleGANGenerator(
            g.latent_dim, g.w_dim, image_size, g.channels, g.base_channels, g.max_channels, g.mapping_layers,
            g.num_classes,
        ),
        StyleGANDiscriminator(image_size, g.channels, g.base_channels, g.max_channels, g.num_classes, g.mbstd_group),
    )  # fmt: skip


class GANTraining(Method):
    """`forward(batch, player)`: the discriminator's loss on the batch's real images and fresh fakes, or the
    generator's on fresh fakes scored by the discriminator."""

    def __init__(self, cfg: GANConfig, image_size: int, seed: int = 0) -> None:
        super().__init__()
        self.cfg, self.image_size, self.seed = cfg, image_size, seed
        self.generator, self.discriminator = build_networks(cfg, image_size)
        # Starts equal to the generator (init_weights copies it again after an engine's meta-device build).
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._step: int | None = None  # host copy of steps_done, read once (after a resume) then kept in step

    @torch.no_grad()
    def init_weights(self) -> None:
        self.generator.init_weights()
        self.discriminator.init_weights()
        self.steps_done.zero_()
        self._step = None
        self.copy_online_to_averaged()

    @torch.no_grad()
    def copy_online_to_averaged(self) -> None:
        super().copy_online_to_averaged()
        self._copy_buffers()

    @torch.no_grad()
    def _copy_buffers(self) -> None:
        for average, online in zip(self.generator_ema.buffers(), self.generator.buffers()):
            average.copy_(online)

    def players(self) -> list[Player]:
        return [
            Player("discriminator", ("discriminator",), self.cfg.discriminator),
            Player("generator", ("generator",), self.cfg.generator),
        ]

    def inference_network(self) -> nn.Module:
        return self.generator_ema

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return []

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.generator_ema, self.generator)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return self.cfg.ema_momentum

    def on_step_end(self, step: int, total_steps: int) -> None:
        self._copy_buffers()
        self.steps_done.fill_(step)
        self._step = step

    def _labels(self, batch: dict[str, Tensor]) -> Tensor | None:
        return batch["label"] if self.cfg.num_classes else None

    def _fake(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["image"]
        z = torch.randn(x.shape[0], self.cfg.latent_dim, device=x.device, dtype=x.dtype)
        if self.cfg.arch == "stylegan":
            return self.generator(z, self._labels(batch), style_mixing_prob=self.cfg.style_mixing)
        return self.generator(z, self._labels(batch))

    def r1_due(self) -> bool:
        """Whether this step's discriminator update carries the lazy R1 term (steps 0, k, 2k, ...)."""
        if self._step is None:
            self._step = int(self.steps_done)
        return self.cfg.r1_gamma > 0 and self._step % self.cfg.r1_interval == 0

    def forward(self, batch: dict[str, Tensor], player: str = "discriminator") -> dict[str, Tensor]:
        labels = self._labels(batch)
        if player == "generator":
            fake_logits = self.discriminator(self._fake(batch), labels)
            if self.cfg.loss == "hinge":
                return {"loss": hinge_generator_loss(fake_logits)}
            return {"loss": generator_nonsaturating_loss(fake_logits)}
        if player != "discriminator":
            raise ValueError(f"the GAN's players are 'discriminator' and 'generator', not {player!r}")
        with torch.no_grad():
            fake = self._fake(batch)
        real = batch["image"].detach().requires_grad_(self.r1_due())
        real_logits = self.discriminator(real, labels)  # real and fake in separate batches (DCGAN's BatchNorm)
        fake_logits = self.discriminator(fake, labels)
        losses = hinge_discriminator_loss if self.cfg.loss == "hinge" else discriminator_loss
        loss = losses(real_logits, fake_logits)
        out = {"real_score": real_logits.detach().mean(), "fake_score": fake_logits.detach().mean()}
        if real.requires_grad:
            penalty = r1_penalty(real, real_logits)
            loss = loss + lazy_r1_weight(self.cfg.r1_gamma, self.cfg.r1_interval) * penalty
            out["r1"] = penalty.detach()
        return {"loss": loss, **out}

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor | None,
        num: int,
        generator: torch.Generator | None = None,
        truncation_psi: float | None = None,
        latents: Tensor | None = None,
    ) -> Tensor:
        """`num` images in [-1, 1] from the EMA generator in eval mode (labels for a conditional model), from
        `latents` or fresh ones drawn with `generator`."""
        net = self.generator_ema
        device = next(net.parameters()).device
        if latents is None:
            latents = torch.randn(num, self.cfg.latent_dim, generator=generator, device=device)
        was_training = net.training
        net.eval()
        try:
            if self.cfg.arch == "stylegan":
                psi = self.cfg.truncation_psi if truncation_psi is None else truncation_psi
                images = net(latents, labels, truncation_psi=psi, generator=generator, update_w_avg=False)
            else:
                images = net(latents, labels)
        finally:
            net.train(was_training)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def interpolations(self, pairs: int, steps: int, generator: torch.Generator) -> Tensor:
        """Rows of images between fixed latent pairs: linear in z for DCGAN (the paper's walks), linear in w for
        StyleGAN (its intermediate latent space, where the paper measures path smoothness); the class of a
        conditional model is row index mod num_classes."""
        net = self.generator_ema
        device = next(net.parameters()).device
        z = torch.randn(2, pairs, self.cfg.latent_dim, generator=generator, device=device)
        labels = torch.arange(pairs, device=device) % self.cfg.num_classes if self.cfg.num_classes else None
        alphas = torch.linspace(0, 1, steps, device=device)
        was_training = net.training
        net.eval()
        try:
            if self.cfg.arch == "stylegan":
                w = [net.mapping.truncate(net.mapping(z[i], labels, update_w_avg=False), self.cfg.truncation_psi)
                     for i in range(2)]  # fmt: skip
                mixed = torch.lerp(w[0][:, None], w[1][:, None], alphas[None, :, None]).flatten(0, 1)
                ws = mixed[:, None].expand(-1, net.num_ws, -1)
                images = net.synthesis(ws, noise_mode="const")
            else:
                mixed = torch.lerp(z[0][:, None], z[1][:, None], alphas[None, :, None]).flatten(0, 1)
                rows = None if labels is None else labels.repeat_interleave(steps)
                images = net(mixed, rows)
        finally:
            net.train(was_training)
        return images.clamp(-1, 1)

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Samples from fixed latents (one row per class, the first 10, for a conditional model) and latent
        interpolations between fixed pairs: the same cells at every call, so grids compare across steps."""
        device = batch["image"].device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        rows = min(self.cfg.num_classes, 10) if self.cfg.num_classes else 1
        labels = torch.arange(rows, device=device).repeat_interleave(self.cfg.vis_samples)
        labels = labels if self.cfg.num_classes else None
        samples = self.generate(labels, rows * self.cfg.vis_samples, generator)
        out = {"samples": image_grid(to_unit(samples), nrow=self.cfg.vis_samples)}
        if self.cfg.vis_interpolations:
            walks = self.interpolations(self.cfg.vis_interpolations, self.cfg.vis_interpolation_steps, generator)
            out["interpolations"] = image_grid(to_unit(walks), nrow=self.cfg.vis_interpolation_steps)
        return out


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    g = cfg.method.gan
    size = cfg.data.image_size
    if size < 8 or size & (size - 1):
        raise ConfigError(f"data.image_size: a GAN generates power-of-2 sides >= 8, got {size}")
    if g.arch == "stylegan":
        group = min(g.mbstd_group, cfg.data.batch_size)
        if cfg.data.batch_size % group:
            raise ConfigError(
                f"method.gan.mbstd_group: data.batch_size {cfg.data.batch_size} is not a multiple of the "
                f"minibatch-std group {group}"
            )
    for name in ("generator", "discriminator"):
        player = getattr(g, name)
        if player.betas and (len(player.betas) != 2 or not all(0 <= b < 1 for b in player.betas)):
            raise ConfigError(f"method.gan.{name}.betas: two values in [0, 1), got {list(player.betas)}")
        settings = player.resolve(cfg.optim)
        if settings.min_lr > settings.base_lr:
            raise ConfigError(
                f"method.gan.{name}.min_lr: {settings.min_lr} exceeds the player's base_lr {settings.base_lr}"
            )
        if settings.warmup_steps > cfg.train.steps:
            raise ConfigError(f"method.gan.{name}.warmup_steps: {settings.warmup_steps} exceeds train.steps")


def build(cfg: Config) -> GANTraining:
    return GANTraining(cfg.method.gan, cfg.data.image_size, cfg.run.seed)


def train_transform(cfg: Config):
    return pixel_transform(cfg.data.image_size, cfg.method.gan.channels, cfg.data.crop_scale, cfg.data.hflip)


SPEC = MethodSpec("gan", GANConfig, build, train_transform, validate=validate, players=True)
