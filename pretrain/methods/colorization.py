"""Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization"), and optionally the split-brain
autoencoder (Zhang, Isola & Efros 2017, "Split-Brain Autoencoders").

Classification form. Images are converted to CIE Lab (data_pipeline/lab.py: sRGB gamma, D65 white). The L
channel goes in: the `model.*` ViT is built with one input channel (L / 50 - 1, the paper's centering);
`model.in_chans` stays the images' 3 RGB channels. A per-token decoder predicts, for every pixel of its
patch (subsampled by `downsample`, the paper predicts at 1/4 resolution), logits over the Q ab bins; the
targets are every `downsample`-th pixel's ab (ab[::4, ::4] at 4, as the paper's stride-4 subsampling).

The bins. ab is cut into a grid of `grid` units with centers at the multiples of `grid` in
[-ab_range, ab_range]; the kept bins are those the sRGB gamut reaches: every RGB color of a dense lattice
(the cube's faces at 256 steps, its inside at 64) converted to Lab and rounded to its bin. We take the
gamut, not the training pixels, for the bin set so the head's size is known before any data is read (and a
meta-device build has its shapes): 261 bins at grid 10. The paper's 313 are the bins ImageNet's pixels
occupy in its own conversion, not the same set. Pixels (targets, prior counts) go to their nearest kept bin.

The prior. The empirical distribution of the training pixels over the bins is counted ON THE TRAINING DATA
when the method is built: the first `prior_images` images of the sorted training shards (data.shards,
data.split), every pixel assigned to its nearest bin. `prior_images = 0` takes a uniform prior instead
(benchmarks on synthetic batches, tests). The bins, the prior and the class weights are persistent
buffers: saved in every checkpoint, so a resumed or evaluated run uses the ones it trained with (a rebuild
counts again, then loading the checkpoint overwrites them).

The loss (paper eq. 2-4): cross-entropy against soft targets (each pixel's `soft_neighbors` = 5 nearest
bins weighted by a Gaussian of sigma `soft_sigma` = 5 around the true ab), each pixel weighted by w of its
nearest bin, w ~ ((1 - lambda) p~ + lambda / Q)^-1 with p~ the prior smoothed by a Gaussian of sigma
`prior_sigma` = 5 (ab units) and lambda = `rebalance` = 0.5, normalized so E_p~[w] = 1. The paper sums over
pixels; we average (a constant factor). Pictures decode the annealed mean, T = `temperature` = 0.38.

Split-brain (`split_brain = true`). Two ViTs of `model.size`: L -> ab (the classification above, its
rebalancing kept: ours, not checked against the 2017 paper) and ab -> L (input ab / ab_range), classifying
L into `l_bins` = 50 uniform bins of [0, 100] with a plain cross-entropy (the 2017 paper: classification
for both halves, L in 50 bins). The loss is the sum of the two. The paper splits one network's channels in
half; here each half is a whole `model.size` ViT (ours). Evaluation (kNN, linear probe) uses the concatenation of
both halves' pooled features: `inference_network().forward_features`.

The paper's network is a VGG-style CNN with dilated convolutions; here it is the ViT and a linear (or MLP)
decoder per token. kNN and the linear probe see the L channel (and ab for split-brain) of whole images.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.decode import IMAGE_EXTENSIONS, decode_image
from data_pipeline.lab import lab_to_rgb, rgb_to_lab
from data_pipeline.reader import ShardFailure, read_shard
from data_pipeline.shardlist import resolve_shards
from pretrain.config import Config, ConfigError, bounded
from pretrain.flops import FlopCount, linear_flops
from pretrain.methods.backbone import build_vit_backbone, validate_vit_backbone, vit_backbone_flops, vit_width
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VisionTransformer, unpatchify
from pretrain.visualize import image_grid

CPU = torch.device("cpu")  # build-time tables: explicit, so a meta-device build still computes them


@dataclass
class ColorizationConfig:
    """method.colorization"""

    grid: int = bounded(10, gt=0)  # ab bin size; centers at its multiples
    ab_range: int = bounded(110, gt=0)  # centers within [-ab_range, ab_range]; grid must divide it
    soft_neighbors: int = bounded(5, gt=0)
    soft_sigma: float = bounded(5.0, gt=0)
    prior_sigma: float = bounded(5.0, gt=0)
    rebalance: float = bounded(0.5, ge=0, le=1)  # lambda
    temperature: float = bounded(0.38, gt=0)  # annealed mean of the pictures
    downsample: int = bounded(4, gt=0)  # predictions at 1/downsample of the resolution
    prior_images: int = bounded(1000, ge=0)  # training images counted for the prior; 0 = uniform
    decoder_hidden_dim: int = bounded(0, ge=0)  # 0 = one linear layer per token, > 0 = an MLP
    split_brain: bool = False
    l_bins: int = bounded(50, gt=1)  # split-brain's ab -> L classes


# ---------------------------------------------------------------------- ab bins, soft targets, weights


def quantize_ab(ab: Tensor, grid: int) -> Tensor:
    """Each ab value to the center of its grid cell (the nearest multiple of `grid`)."""
    return torch.round(ab / grid) * grid


def full_grid(grid: int, ab_range: int) -> Tensor:
    """[G * G, 2] every bin center (a major, b minor), G = 2 * ab_range / grid + 1."""
    axis = torch.arange(-ab_range, ab_range + 1, grid, dtype=torch.float32, device=CPU)
    a, b = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([a.flatten(), b.flatten()], dim=1)


def _cube_lattice() -> Tensor:
    """sRGB colors [3, N, 1]: the cube's 6 faces at 256 steps and its inside at 64."""
    fine, coarse = torch.linspace(0, 1, 256, device=CPU), torch.linspace(0, 1, 64, device=CPU)
    u, v = (t.flatten() for t in torch.meshgrid(fine, fine, indexing="ij"))
    faces = [
        torch.stack([torch.full_like(u, side) if axis == k else (u if k == (axis + 1) % 3 else v) for k in range(3)])
        for axis in range(3)
        for side in (0.0, 1.0)
    ]
    inside = torch.stack([t.flatten() for t in torch.meshgrid(coarse, coarse, coarse, indexing="ij")])
    return torch.cat([*faces, inside], dim=1)[:, :, None]


@lru_cache(maxsize=8)
def _gamut_bins(grid: int, ab_range: int) -> tuple[tuple[float, float], ...]:
    ab = rgb_to_lab(_cube_lattice())[1:, :, 0].T
    cells = torch.unique(quantize_ab(ab, grid), dim=0)  # sorted: a major, b minor
    inside = (cells.abs() <= ab_range).all(dim=1)
    return tuple(map(tuple, cells[inside].tolist()))


def gamut_bins(grid: int, ab_range: int) -> Tensor:
    """[Q, 2] the centers of the bins the sRGB gamut reaches, sorted (a major, b minor)."""
    return torch.tensor(_gamut_bins(grid, ab_range), dtype=torch.float32, device=CPU)


def nearest_bin(ab: Tensor, bins: Tensor) -> Tensor:
    """ab [B, 2, H, W] -> long [B, H, W] index of the nearest bin center."""
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2)
    return torch.cdist(flat, bins.to(flat)).argmin(dim=1).view(ab.shape[0], *ab.shape[2:])


def soft_encode(ab: Tensor, bins: Tensor, neighbors: int = 5, sigma: float = 5.0) -> Tensor:
    """ab [B, 2, H, W] -> soft targets [B, Q, H, W]: the `neighbors` nearest bins weighted by
    exp(-d^2 / (2 sigma^2)), normalized to sum 1 (the paper's 5 neighbours, sigma 5)."""
    batch, _, height, width = ab.shape
    flat = ab.permute(0, 2, 3, 1).reshape(-1, 2).float()
    distance, index = torch.cdist(flat, bins.float()).topk(neighbors, dim=1, largest=False)
    weights = torch.softmax(-distance.pow(2) / (2 * sigma**2), dim=1)
    targets = torch.zeros(flat.shape[0], bins.shape[0], device=ab.device).scatter_(1, index, weights)
    return targets.view(batch, height, width, -1).permute(0, 3, 1, 2)


def gaussian_smooth_on_grid(values: Tensor, bins: Tensor, grid: int, ab_range: int, sigma: float) -> Tensor:
    """Values on the bins [Q] placed on the full ab grid, convolved with a 2-D Gaussian of `sigma` ab units
    (zeros beyond the grid), read back at the bins."""
    side = 2 * ab_range // grid + 1
    index = ((bins + ab_range) / grid).round().long()
    plane = torch.zeros(side, side, dtype=values.dtype, device=values.device)
    plane[index[:, 0], index[:, 1]] = values
    radius = max(1, math.ceil(3 * sigma / grid))
    offsets = torch.arange(-radius, radius + 1, dtype=values.dtype, device=values.device) * grid
    kernel = torch.exp(-offsets.pow(2) / (2 * sigma**2))
    kernel2d = (kernel[:, None] * kernel[None, :]) / kernel.sum() ** 2
    smoothed = F.conv2d(plane[None, None], kernel2d[None, None], padding=radius)[0, 0]
    return smoothed[index[:, 0], index[:, 1]]


def rebalance_weights(prior: Tensor, smoothed: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """(p~, w): p~ = `smoothed` renormalized to sum 1, w = ((1 - lam) p~ + lam / Q)^-1 scaled so that
    sum_q p~_q w_q = 1 (paper eq. 4). `prior` is only checked to be a distribution over the same bins."""
    assert prior.shape == smoothed.shape
    p_tilde = smoothed / smoothed.sum()
    weights = 1.0 / ((1 - lam) * p_tilde + lam / p_tilde.numel())
    return p_tilde, weights / (p_tilde * weights).sum()


def annealed_mean(logits: Tensor, bins: Tensor, temperature: float) -> Tensor:
    """logits [B, Q, H, W] -> ab [B, 2, H, W]: the mean of bins under f_T(z) = exp(log z / T) / sum, z the
    softmax of the logits (T -> 0: the mode, T = 1: the mean)."""
    annealed = torch.softmax(torch.log_softmax(logits.float(), dim=1) / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", annealed, bins.to(annealed))


def count_prior(shards: str, split: str, images: int, bins: Tensor) -> Tensor:
    """float64 [Q] pixel counts of the first `images` images of the sorted training shards over the bins."""
    counts = torch.zeros(bins.shape[0], dtype=torch.float64, device=CPU)
    seen = 0
    try:
        urls = resolve_shards(shards, split)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"method.colorization.prior_images: the prior is counted on data.shards: {exc}") from exc
    for url in urls:
        for record in read_shard(url):
            if seen >= images:
                return counts
            if isinstance(record, ShardFailure):
                break
            data = next((record[ext] for ext in IMAGE_EXTENSIONS if ext in record), None)
            if data is None:
                continue
            pixels = np.asarray(decode_image(data, record["__key__"]), dtype=np.float32) / 255.0
            ab = rgb_to_lab(torch.from_numpy(pixels).permute(2, 0, 1)[None])[:, 1:]
            counts += torch.bincount(nearest_bin(ab, bins).flatten(), minlength=bins.shape[0]).double()
            seen += 1
    if seen == 0:
        raise ConfigError(f"method.colorization.prior_images: no image could be read from data.shards {shards!r}")
    return counts


# ---------------------------------------------------------------------- the networks


def token_decoder(width: int, hidden_dim: int, outputs: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(width, outputs)
    return nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, outputs))


def to_lab(images: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalized RGB [B, 3, H, W] -> Lab in float32."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return rgb_to_lab((images.float() * std_t + mean_t).clamp(0, 1))


def l_input(lab: Tensor) -> Tensor:
    return lab[:, :1] / 50 - 1


def ab_input(lab: Tensor, ab_range: int) -> Tensor:
    return lab[:, 1:] / ab_range


class LabEncoder(nn.Module):
    """What evaluation sees: normalized RGB images in, the L network's pooled features out (with split-brain,
    the L and ab networks' features concatenated)."""

    def __init__(
        self,
        l_net: VisionTransformer,
        ab_net: VisionTransformer | None,
        ab_range: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        super().__init__()
        self.l_net, self.ab_net = l_net, ab_net
        self.ab_range, self.image_mean, self.image_std = ab_range, mean, std
        self.embed_dim = l_net.embed_dim * (2 if ab_net is not None else 1)

    def forward_features(self, images: Tensor, pool: str | None = None) -> Tensor:
        lab = to_lab(images, self.image_mean, self.image_std)
        features = self.l_net.forward_features(l_input(lab), pool)
        if self.ab_net is None:
            return features
        return torch.cat([features, self.ab_net.forward_features(ab_input(lab, self.ab_range), pool)], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)


class Colorization(Method):
    num_visuals = 8

    def __init__(
        self,
        l_net: VisionTransformer,
        bins: Tensor,
        prior: Tensor,
        grid: int = 10,
        ab_range: int = 110,
        soft_neighbors: int = 5,
        soft_sigma: float = 5.0,
        prior_sigma: float = 5.0,
        rebalance: float = 0.5,
        temperature: float = 0.38,
        downsample: int = 4,
        decoder_hidden_dim: int = 0,
        ab_net: VisionTransformer | None = None,
        l_bins: int = 50,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.encoder = LabEncoder(l_net, ab_net, ab_range, mean, std)
        self.grid, self.ab_range, self.soft_neighbors, self.soft_sigma = grid, ab_range, soft_neighbors, soft_sigma
        self.prior_sigma, self.rebalance, self.temperature = prior_sigma, rebalance, temperature
        self.downsample, self.l_bins = downsample, l_bins
        self.cell = l_net.patch_size // downsample  # predicted pixels per token side
        bins_count = bins.shape[0]
        self.ab_decoder = token_decoder(l_net.embed_dim, decoder_hidden_dim, self.cell**2 * bins_count)
        self.l_decoder = (
            token_decoder(ab_net.embed_dim, decoder_hidden_dim, self.cell**2 * l_bins) if ab_net is not None else None
        )
        # The tables computed at build (bins from the gamut, prior from the training data), copied into the
        # persistent buffers by init_weights (also after a meta-device build).
        self._tables = (bins.detach().to(CPU, torch.float32).clone(), prior.detach().to(CPU, torch.float64).clone())
        self.register_buffer("bins", torch.zeros(bins_count, 2))
        self.register_buffer("prior", torch.zeros(bins_count))  # the empirical prior p (sum 1)
        self.register_buffer("smoothed_prior", torch.zeros(bins_count))  # p~
        self.register_buffer("class_weights", torch.zeros(bins_count))  # w
        self.init_weights()

    @property
    def l_net(self) -> VisionTransformer:
        return self.encoder.l_net

    @property
    def ab_net(self) -> VisionTransformer | None:
        return self.encoder.ab_net

    @torch.no_grad()
    def init_weights(self) -> None:
        for net in (self.l_net, self.ab_net):
            if net is not None:
                net.init_weights()
        for decoder in (self.ab_decoder, self.l_decoder):
            if decoder is not None:
                decoder.apply(init_linear_and_norm)
        bins, counts = self._tables
        prior = counts / counts.sum()
        smoothed = gaussian_smooth_on_grid(prior, bins.double(), self.grid, self.ab_range, self.prior_sigma)
        p_tilde, weights = rebalance_weights(prior, smoothed, self.rebalance)
        for name, value in (("bins", bins), ("prior", prior), ("smoothed_prior", p_tilde), ("class_weights", weights)):
            getattr(self, name).copy_(value.to(torch.float32))

    def inference_network(self) -> LabEncoder:
        return self.encoder

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [net.blocks for net in (self.l_net, self.ab_net) if net is not None]

    def no_weight_decay(self) -> set[str]:
        names = {f"encoder.l_net.{name}" for name in self.l_net.no_weight_decay()}
        if self.ab_net is not None:
            names |= {f"encoder.ab_net.{name}" for name in self.ab_net.no_weight_decay()}
        return names

    def predict_ab_logits(self, lab: Tensor) -> Tensor:
        """[B, Q, H / downsample, W / downsample] ab-bin logits from the L channel."""
        tokens = self.l_net.forward_tokens(l_input(lab))[:, 1:]
        return unpatchify(self.ab_decoder(tokens), self.cell, self.bins.shape[0])

    def predict_l_logits(self, lab: Tensor) -> Tensor:
        """Split-brain: [B, l_bins, H / downsample, W / downsample] L-bin logits from ab."""
        tokens = self.ab_net.forward_tokens(ab_input(lab, self.ab_range))[:, 1:]
        return unpatchify(self.l_decoder(tokens), self.cell, self.l_bins)

    def subsample(self, x: Tensor) -> Tensor:
        return x[..., :: self.downsample, :: self.downsample]

    def ab_loss(self, logits: Tensor, ab: Tensor) -> Tensor:
        """Rebalanced cross-entropy of the logits against the soft-encoded ab (both at the predicted size)."""
        targets = soft_encode(ab, self.bins, self.soft_neighbors, self.soft_sigma)
        pixel_weights = self.class_weights[targets.argmax(dim=1)]
        cross_entropy = -(targets * torch.log_softmax(logits.float(), dim=1)).sum(dim=1)
        return (pixel_weights * cross_entropy).mean()

    def l_classes(self, light: Tensor) -> Tensor:
        return (light / 100 * self.l_bins).floor().long().clamp(0, self.l_bins - 1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        lab = to_lab(batch["image"], self.encoder.image_mean, self.encoder.image_std)
        target = self.subsample(lab)
        ab_loss = self.ab_loss(self.predict_ab_logits(lab), target[:, 1:])
        if self.ab_net is None:
            return {"loss": ab_loss}
        l_loss = F.cross_entropy(self.predict_l_logits(lab).float(), self.l_classes(target[:, 0]))
        return {"loss": ab_loss + l_loss, "ab_loss": ab_loss.detach(), "l_loss": l_loss.detach()}

    def colorize(self, lab: Tensor) -> Tensor:
        """RGB [B, 3, H, W]: the input's L with the annealed-mean ab, upsampled to full size."""
        ab = annealed_mean(self.predict_ab_logits(lab), self.bins, self.temperature)
        ab = F.interpolate(ab, size=lab.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lab[:, :1], ab], dim=1))

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows: the grayscale input (L, ab = 0), the prediction (annealed mean), the ground truth."""
        lab = to_lab(batch["image"][: self.num_visuals], self.encoder.image_mean, self.encoder.image_std)
        gray = lab_to_rgb(torch.cat([lab[:, :1], torch.zeros_like(lab[:, 1:])], dim=1))
        rows = torch.cat([gray, self.colorize(lab), lab_to_rgb(lab)]).float()
        return {"colorization": image_grid(rows, nrow=len(lab))}


# ---------------------------------------------------------------------- the method's spec


def with_in_chans(cfg: Config, channels: int) -> Config:
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, in_chans=channels))


def validate(cfg: Config) -> None:
    validate_vit_backbone(cfg)
    c = cfg.method.colorization
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: colorization uses one crop per image, got {cfg.data.local_crops}")
    if cfg.model.in_chans != 3:
        raise ConfigError(f"model.in_chans: colorization converts RGB images to Lab, needs 3, got {cfg.model.in_chans}")
    if c.ab_range % c.grid:
        raise ConfigError(
            f"method.colorization.grid: {c.grid} does not divide method.colorization.ab_range {c.ab_range}"
        )
    if cfg.model.patch_size % c.downsample:
        raise ConfigError(
            f"method.colorization.downsample: {c.downsample} does not divide model.patch_size {cfg.model.patch_size}"
        )
    bins = len(_gamut_bins(c.grid, c.ab_range))
    if c.soft_neighbors > bins:
        raise ConfigError(f"method.colorization.soft_neighbors: {c.soft_neighbors} > the {bins} in-gamut bins")


def build(cfg: Config) -> Colorization:
    c = cfg.method.colorization
    bins = gamut_bins(c.grid, c.ab_range)
    if c.prior_images:
        counts = count_prior(cfg.data.shards, cfg.data.split, c.prior_images, bins)
    else:
        counts = torch.ones(bins.shape[0], dtype=torch.float64, device=CPU)
    ab_net = build_vit_backbone(with_in_chans(cfg, 2)) if c.split_brain else None
    return Colorization(
        build_vit_backbone(with_in_chans(cfg, 1)),
        bins,
        counts,
        c.grid,
        c.ab_range,
        c.soft_neighbors,
        c.soft_sigma,
        c.prior_sigma,
        c.rebalance,
        c.temperature,
        c.downsample,
        c.decoder_hidden_dim,
        ab_net,
        c.l_bins,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """The L network and its decoder (and for split-brain the ab network and its decoder); the Lab
    conversion and the soft encoding are elementwise or small and left out."""
    c, size = cfg.method.colorization, cfg.data.image_size
    tokens = (size // cfg.model.patch_size) ** 2
    cell = (cfg.model.patch_size // c.downsample) ** 2
    width = vit_width(cfg)

    def decoder(outputs: int) -> float:
        dims = [width, c.decoder_hidden_dim, outputs] if c.decoder_hidden_dim else [width, outputs]
        return sum(linear_flops(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))

    total = vit_backbone_flops(with_in_chans(cfg, 1), size) + FlopCount(
        decoder(cell * len(_gamut_bins(c.grid, c.ab_range)))
    )
    if c.split_brain:
        total = total + vit_backbone_flops(with_in_chans(cfg, 2), size) + FlopCount(decoder(cell * c.l_bins))
    return total


def synthetic_overrides(cfg: Config) -> list[str]:
    """Without shards there are no pixels to count the prior on: a uniform one."""
    return ["method.colorization.prior_images=0"] if cfg.method.colorization.prior_images else []


# One random resized crop (and flip) per image, as the paper's training crops; Lab is computed in `forward`.
SPEC = MethodSpec(
    "colorization",
    ColorizationConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    crop_views=single_crop_views,
    synthetic_overrides=synthetic_overrides,
)
