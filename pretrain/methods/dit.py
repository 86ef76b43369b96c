"""Class-conditional DiT trained with rectified flow, with an EMA copy of its weights for sampling."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from data_pipeline.manifest import Manifest
from pretrain.activation_memory import STAT, blocks_bytes, dit_block
from pretrain.config import Config, ConfigError, bounded, check_choice
from pretrain.diffusion.flow import flow_matching_loss, interpolate, logit_normal_timesteps
from pretrain.diffusion.sampling import Sampler, VelocityFn, guided_velocity, sample
from pretrain.diffusion.transforms import latent_transform, pixel_transform, to_unit
from pretrain.flops import FlopCount, block_flops, linear_flops, mlp_flops
from pretrain.methods.base import Method
from pretrain.methods.spec import MethodSpec
from pretrain.methods.vae import load_vae
from pretrain.models.dit import DIT_SIZES, DiT, build_dit
from pretrain.visualize import image_grid


@dataclass
class DiTConfig:
    """method.dit: the DiT network (the ViT `model.*` section does not apply to DiT) and rectified flow."""

    # S | B | L | XL, the DiT paper's sizes (pretrain/models/dit.py: DIT_SIZES).
    size: str = "XL"
    # Nonzero: override the size's width, depth or heads (small CPU models).
    hidden_dim: int = bounded(0, ge=0)
    depth: int = bounded(0, ge=0)
    num_heads: int = bounded(0, ge=0)
    # 2, 4 or 8.
    patch_size: int = bounded(2, gt=0)
    # Side of the network's input: latent side (image side / VAE factor), or pixels.
    input_size: int = bounded(32, gt=0)
    # Latent channels, or image channels (1 or 3) in pixel space.
    in_channels: int = bounded(4, gt=0)
    num_classes: int = bounded(1000, gt=0)
    # Probability a label is replaced by the null class (for guidance).
    class_dropout: float = bounded(0.1, ge=0, lt=1)
    # latent: data.shards are latent shards (pretrain data latents) | pixel: images in [-1, 1].
    space: Literal["latent", "pixel"] = "latent"
    # Latents are multiplied by this; 0: the scale_factor in the latent manifest.
    latent_scale: float = bounded(0.0, ge=0)
    # Decodes latent samples into pictures: a vae run/checkpoint or a diffusers AutoencoderKL directory.
    vae: str = ""
    # Rectified flow: timesteps t = sigmoid(N(t_mean, t_std^2)), shifted toward noise by t_shift > 1.
    t_mean: float = 0.0
    t_std: float = bounded(1.0, gt=0)
    t_shift: float = bounded(1.0, gt=0)
    ema_momentum: float = bounded(0.9999, ge=0, le=1)
    # m = min(ema_momentum, (1 + step) / (10 + step)): for short runs.
    ema_warmup: bool = False
    # Sample grids logged every train.vis_every steps.
    sample_steps: int = bounded(50, gt=0)
    # Guidance scale s of the paper: v = v_uncond + s (v_cond - v_uncond); 1 = no guidance. Checkpoints
    # written before this convention stored w = s - 1 (pretrain/recipes.py: upgrade_saved_config).
    sample_cfg_scale: float = bounded(5.0, ge=0)
    # Guide only the first N channels (the released DiT sampler: 3 of 4 latent channels); 0 = all.
    sample_guided_channels: int = bounded(0, ge=0)
    sampler: Sampler = "euler"
    # The network also takes the guidance scale s as an input (guidance distillation's student, trained by
    # method dit_distill from a teacher without it); method dit refuses it.
    guidance_embed: bool = False


class RectifiedFlowDiT(Method):
    """Trains `model` to predict v = z - x at x_t = (1 - t) x + t z; keeps `ema`, its exponential moving
    average, which the engine updates after every optimizer step and which sampling uses.

    The EMA copy lives in this module so it is checkpointed (and sharded) with the model; its
    parameters do not require grad, so the optimizer never sees them. In latent space `decode`
    maps latents back to pixels with a VAE that is loaded on first use and kept outside the module
    tree (it is not trained and not checkpointed with the DiT).
    """

    def __init__(
        self,
        model: DiT,
        *,
        t_mean: float = 0.0,
        t_std: float = 1.0,
        t_shift: float = 1.0,
        ema_momentum: float = 0.9999,
        ema_warmup: bool = False,
        latent_scale: float = 1.0,
        vae_path: str = "",
        sample_steps: int = 50,
        sample_cfg_scale: float = 5.0,
        sample_guided_channels: int = 0,
        sampler: str = "euler",
    ) -> None:
        super().__init__()
        self.model = model
        self.ema = copy.deepcopy(model).requires_grad_(False)
        self.t_mean, self.t_std, self.t_shift = t_mean, t_std, t_shift
        self.ema_base, self.ema_warmup = ema_momentum, ema_warmup
        self.vae_path = vae_path
        self.sample_steps, self.sample_cfg_scale, self.sampler = sample_steps, sample_cfg_scale, sampler
        self.sample_guided_channels = sample_guided_channels
        # Persistent, so a checkpoint samples correctly without the latent manifest it was trained from.
        self.register_buffer("latent_scale", torch.tensor(float(latent_scale)))
        self.initial_latent_scale = float(latent_scale)
        self.__dict__["_vae"] = None  # not a submodule: never trained, saved or sharded with the DiT

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialize the model and start the EMA equal to it (e.g. after building on the meta device)."""
        self.model.init_weights()
        self.ema.init_weights()
        self.latent_scale.fill_(self.initial_latent_scale)
        self.copy_online_to_averaged()

    def inference_network(self) -> DiT:
        """The EMA network: the weights to sample from and to export."""
        return self.ema

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [self.model.blocks, self.ema.blocks]

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.ema, self.model)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """The configured momentum; with warmup, min(m, (1 + step) / (10 + step)) so that a short run's
        average is not dominated by its random initialization."""
        if self.ema_warmup:
            return min(self.ema_base, (1 + step) / (10 + step))
        return self.ema_base

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        noise = torch.randn_like(x)
        t = logit_normal_timesteps(x.shape[0], self.t_mean, self.t_std, self.t_shift, x.device)
        prediction = self.model(interpolate(x, noise, t), t, batch["label"])
        return {"loss": flow_matching_loss(prediction, x, noise)}

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        steps: int | None = None,
        cfg_scale: float | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        guided_channels: int | None = None,
        network: DiT | None = None,
    ) -> Tensor:
        """Samples in the network's space (latents, or pixels in [-1, 1]) for `labels`, from the EMA weights
        (or the online ones, or another DiT of this method: a distillation's teacher); `cfg_scale` is the paper's
        s (1: no guidance)."""
        net = network or (self.ema if use_ema else self.model)
        was_training = net.training
        net.eval()
        try:
            shape = (labels.shape[0], net.in_channels, net.input_size, net.input_size)
            device = net.x_embedder.weight.device
            noise = torch.randn(shape, generator=generator, device=device)
            scale = self.sample_cfg_scale if cfg_scale is None else cfg_scale
            channels = self.sample_guided_channels if guided_channels is None else guided_channels
            velocity = self.velocity(net, labels.to(device), scale, channels)
            return self.integrate(velocity, noise, steps or self.sample_steps, sampler or self.sampler, generator, net)
        finally:
            net.train(was_training)

    def velocity(self, net: DiT, labels: Tensor, scale: float, guided_channels: int) -> VelocityFn:
        """The ODE's velocity for `labels` at guidance scale s: one forward of the doubled batch when s != 1."""
        return guided_velocity(net, labels, scale, net.null_class, guided_channels)

    def integrate(
        self,
        velocity: VelocityFn,
        noise: Tensor,
        steps: int,
        sampler: str,
        generator: torch.Generator | None,
        net: DiT,
    ) -> Tensor:
        """Noise at t = 1 -> a sample at t = 0 by `net`'s `velocity`: the ODE sampler `sampler` on the shifted grid
        of `steps` steps."""
        return sample(velocity, noise, steps, sampler, self.t_shift)

    def sampler_name(self, sampler: str) -> str:
        """How `integrate` samples with `sampler`, in words (for `pretrain sample`'s message)."""
        return sampler

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        """Network-space samples -> pictures in [0, 1]."""
        if not self.vae_path:
            return to_unit(x.float())
        if self._vae is None:
            self.__dict__["_vae"] = load_vae(self.vae_path).eval()
        vae = self._vae.to(x.device)
        return to_unit(vae.decode(x.float() / self.latent_scale))

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Two rows of EMA samples, one column per class (the first 10), at the configured guidance scale.

        A fixed-seed generator: the same noise at every call, so grids compare across steps, and the
        training RNG stream is untouched.
        """
        num_classes = min(self.ema.num_classes, 10)
        labels = torch.arange(num_classes).repeat(2)
        generator = torch.Generator(device=self.ema.x_embedder.weight.device).manual_seed(0)
        images = self.decode(self.generate(labels, generator=generator))
        return {"samples": image_grid(images, nrow=num_classes)}


def resolve_latent_scale(cfg: Config) -> float:
    """method.dit.latent_scale, else the scale_factor the latent manifest of data.shards records; 1 in pixel space."""
    dit = cfg.method.dit
    if dit.space == "pixel":
        return 1.0
    if dit.latent_scale > 0:
        return dit.latent_scale
    try:
        latent = Manifest.load(cfg.data.shards).latent
    except (FileNotFoundError, ValueError, NotADirectoryError) as exc:
        raise ConfigError(
            f"method.dit.latent_scale: 0 reads it from the latent manifest of data.shards ({exc})"
        ) from exc
    if not latent or not math.isfinite(latent.get("scale_factor", math.nan)):
        raise ConfigError(
            f"method.dit.latent_scale: 0 reads it from data.shards, but {cfg.data.shards} holds no latent manifest; "
            "write latents with `pretrain data latents` or set the scale"
        )
    return float(latent["scale_factor"])


def _latent_scale_or_placeholder(cfg: Config) -> float:
    """Training resolves the scale first (for the data transform) and fails there if it cannot; a method
    rebuilt from a checkpoint gets the saved `latent_scale` buffer, so the data need not be present."""
    try:
        return resolve_latent_scale(cfg)
    except ConfigError:
        return 1.0


def build_network(cfg: Config, class_dropout: float | None = None, guidance_embed: bool | None = None) -> DiT:
    """The DiT of method.dit; `class_dropout` and `guidance_embed` override the section's (a distillation's
    networks drop no labels themselves, and its teacher may lack the student's guidance input)."""
    dit = cfg.method.dit
    return build_dit(
        dit.size,
        hidden_dim=dit.hidden_dim,
        depth=dit.depth,
        num_heads=dit.num_heads,
        input_size=dit.input_size,
        patch_size=dit.patch_size,
        in_channels=dit.in_channels,
        num_classes=dit.num_classes,
        class_dropout=dit.class_dropout if class_dropout is None else class_dropout,
        attn_backend=cfg.model.attn_backend,
        guidance_embed=dit.guidance_embed if guidance_embed is None else guidance_embed,
    )


def method_settings(cfg: Config) -> dict:
    """RectifiedFlowDiT's keyword arguments from method.dit (and the latent manifest)."""
    dit = cfg.method.dit
    return dict(
        t_mean=dit.t_mean,
        t_std=dit.t_std,
        t_shift=dit.t_shift,
        ema_momentum=dit.ema_momentum,
        ema_warmup=dit.ema_warmup,
        latent_scale=_latent_scale_or_placeholder(cfg),
        vae_path=dit.vae if dit.space == "latent" else "",
        sample_steps=dit.sample_steps,
        sample_cfg_scale=dit.sample_cfg_scale,
        sample_guided_channels=dit.sample_guided_channels,
        sampler=dit.sampler,
    )


def build(cfg: Config) -> RectifiedFlowDiT:
    return RectifiedFlowDiT(build_network(cfg), **method_settings(cfg))


def train_transform(cfg: Config):
    dit = cfg.method.dit
    if dit.space == "pixel":
        return pixel_transform(dit.input_size, dit.in_channels, cfg.data.crop_scale, cfg.data.hflip)
    return latent_transform(resolve_latent_scale(cfg))


def validate(cfg: Config) -> None:
    validate_network(cfg)
    if cfg.method.dit.guidance_embed:
        raise ConfigError(
            "method.dit.guidance_embed: a DiT learns its guidance input from a teacher; train one with "
            "method.name = 'dit_distill', method.dit_distill.mode = 'guidance'"
        )


def validate_network(cfg: Config) -> None:
    """The checks of method.dit that every method training a DiT (dit, dit_distill) shares."""
    dit = cfg.method.dit
    check_choice("method.dit.size", dit.size, DIT_SIZES)
    if dit.input_size % dit.patch_size:
        raise ConfigError(
            f"method.dit.input_size: {dit.input_size} is not a multiple of method.dit.patch_size {dit.patch_size}"
        )
    hidden, heads = dit.hidden_dim or DIT_SIZES[dit.size][0], dit.num_heads or DIT_SIZES[dit.size][2]
    if hidden % heads or hidden % 4:
        raise ConfigError(f"method.dit.hidden_dim: {hidden} must be divisible by 4 and by num_heads {heads}")
    if dit.sample_guided_channels > dit.in_channels:
        raise ConfigError(
            f"method.dit.sample_guided_channels: {dit.sample_guided_channels} exceeds method.dit.in_channels {dit.in_channels}"
        )
    if dit.space == "pixel" and dit.in_channels not in (1, 3):
        raise ConfigError(f"method.dit.in_channels: pixel space takes 1 or 3 channels, got {dit.in_channels}")


def flops(cfg: Config) -> FlopCount:
    """One forward of the online network (the rectified-flow step; the EMA copy is not run)."""
    return FlopCount(forward_flops(cfg))


def forward_flops(cfg: Config, guidance_embed: bool | None = None) -> float:
    """One forward of the DiT of method.dit: patch embedding, timestep MLP (and the guidance scale's), per block
    adaLN (6 x dim^2 per sample) + attention + MLP, final adaLN and linear."""
    dit = cfg.method.dit
    dim0, depth0, _ = DIT_SIZES[dit.size]
    dim, depth = dit.hidden_dim or dim0, dit.depth or depth0
    tokens = (dit.input_size // dit.patch_size) ** 2
    patch_dim = dit.patch_size**2 * dit.in_channels
    freq_dim = 256  # TimestepEmbedder's sinusoidal features
    embedders = 2 if (dit.guidance_embed if guidance_embed is None else guidance_embed) else 1
    return (
        linear_flops(tokens, patch_dim, dim)
        + embedders * mlp_flops([freq_dim, dim, dim])
        + depth * (linear_flops(1, dim, 6 * dim) + block_flops(tokens, dim))
        + linear_flops(1, dim, 2 * dim)
        + linear_flops(tokens, dim, patch_dim)
    )


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: one forward of the online DiT on the noisy input, and the velocity MSE."""
    dit = cfg.method.dit
    dim0, depth0, heads0 = DIT_SIZES[dit.size]
    dim, depth, heads = dit.hidden_dim or dim0, dit.depth or depth0, dit.num_heads or heads0
    tokens = (dit.input_size // dit.patch_size) ** 2
    values = dit.in_channels * dit.input_size**2
    return {
        "blocks": blocks_bytes(dit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": values * act,
        "final layer (norm, modulation, linear)": 3 * tokens * dim * act + 2 * tokens * STAT,
        "loss (velocity error)": values * STAT,
    }


def synthetic_overrides(cfg: Config) -> list[str]:
    """Without latent shards the scale cannot come from their manifest; any value keeps the compute."""
    return ["method.dit.latent_scale=1.0"] if cfg.method.dit.latent_scale <= 0 else []


SPEC = MethodSpec(
    "dit",
    DiTConfig,
    build,
    train_transform,
    validate=validate,
    flops=flops,
    activations=activations,
    synthetic_overrides=synthetic_overrides,
)
