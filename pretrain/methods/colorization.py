"""Colorization (Zhang, Isola & Efros 2016, "Colorful Image Colorization"), and optionally the split-brain
autoencoder (Zhang, Isola & Efros 2017, "Split-Brain Autoencoders").

Classification form. Images are converted to CIE Lab (data_pipeline/lab.py: sRGB gamma, D65 white). The L
channel goes in: the `model.*` backbone is built with one input channel (L / 50 - 1, the paper's
centering); `model.in_chans` stays the images' 3 RGB channels. The head predicts logits over the Q ab bins
at 1/`downsample` of the input's resolution (the paper: 1/4); the targets are every `downsample`-th pixel's
ab (ab[::4, ::4] at 4, as the paper's stride-4 subsampling). On a ViT a per-token decoder predicts the
(patch / downsample)^2 cells of its patch. On a ResNet the head is the paper's kind: the last stage's
feature map (1/8 of the input with the small stem, 1/32 with the ImageNet one) through 4x4 stride-2
up-convolutions with BatchNorm and ReLU up to 1/`downsample`, then a 1x1 convolution to the Q logits
(`pretrain/models/conv_decoder.py`; the paper's conv8 up-convolves once, from 1/8, and ends in a 1x1 conv).

The bins. ab is cut into a grid of `grid` units with centers at the multiples of `grid` in
[-ab_range, ab_range]. `bins = "data"` (the default, the paper's): the kept bins are the cells the training
pixels occupy, counted in the same pass as the prior below (313 on ImageNet in the paper's conversion;
the head's size then depends on the data). `bins = "gamut"`: the cells the sRGB gamut reaches, every RGB
color of a dense lattice (the cube's faces at 256 steps, its inside at 64) converted to Lab and rounded to
its cell, 261 at grid 10, known before any data is read (synthetic benchmarks, gray data such as the
digits, whose pixels all sit in one cell). A training pixel belongs to the cell its ab rounds to (clamped to
the range); targets go to their nearest kept bin, which for the counted images is their own cell.

The prior. The empirical distribution of the training pixels over the bins is counted ON THE TRAINING DATA
when the method is built: the first `prior_images` images of the sorted training shards (data.shards,
data.split). `prior_images = 0` takes a uniform prior instead (with `bins = "gamut"` only). The bins, the
prior and the class weights are persistent buffers, saved in every checkpoint. A resume or an evaluation
rebuilds the method from the run's config, which counts the same first images of the same shards again
(the same set, so the checkpoint's buffers load into the same shapes) and then loads the checkpoint's
values: the shards the run trained on must still be at data.shards (or passed as an override).

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
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.decode import IMAGE_EXTENSIONS, decode_image
from data_pipeline.lab import lab_to_rgb, rgb_to_lab
from data_pipeline.reader import ShardFailure, read_shard
from data_pipeline.shardlist import resolve_shards
from pretrain.activation_memory import INDEX, STAT
from pretrain.config import Config, ConfigError, bounded
from pretrain.flops import FlopCount, linear_flops
from pretrain.methods.backbone import (
    backbone_blocks,
    backbone_flops,
    backbone_no_weight_decay,
    backbone_width,
    build_backbone,
    encoder_activations,
    resnet_stride,
    validate_backbone,
    vit_width,
)
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.models.conv_decoder import UpsamplingDecoder, upsampling_decoder_flops
from pretrain.models.resnet import ResNet
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VisionTransformer, unpatchify
from pretrain.visualize import image_grid

CPU = torch.device("cpu")  # build-time tables: explicit, so a meta-device build still computes them

BinSet = Literal["data", "gamut"]


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
    # The ab bins: the cells the counted training pixels occupy (the paper's) | those the sRGB gamut reaches.
    bins: BinSet = "data"
    decoder_hidden_dim: int = bounded(0, ge=0)  # ViT: 0 = one linear layer per token, > 0 = an MLP
    conv_decoder_width: int = bounded(256, gt=0)  # ResNet: channels of the first up-convolution, then halved
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


def training_ab(shards: str, split: str, images: int) -> Iterator[Tensor]:
    """ab [1, 2, H, W] of each of the first `images` images of the sorted training shards, in order."""
    seen = 0
    try:
        urls = resolve_shards(shards, split)
    except (ValueError, FileNotFoundError) as exc:
        raise ConfigError(f"method.colorization.prior_images: the prior is counted on data.shards: {exc}") from exc
    for url in urls:
        for record in read_shard(url):
            if seen >= images:
                return
            if isinstance(record, ShardFailure):
                break
            data = next((record[ext] for ext in IMAGE_EXTENSIONS if ext in record), None)
            if data is None:
                continue
            pixels = np.asarray(decode_image(data, record["__key__"]), dtype=np.float32) / 255.0
            yield rgb_to_lab(torch.from_numpy(pixels).permute(2, 0, 1)[None])[:, 1:]
            seen += 1
    if seen == 0:
        raise ConfigError(f"method.colorization.prior_images: no image could be read from data.shards {shards!r}")


def count_prior(shards: str, split: str, images: int, bins: Tensor) -> Tensor:
    """float64 [Q] pixel counts of the first `images` images of the sorted training shards over the bins."""
    counts = torch.zeros(bins.shape[0], dtype=torch.float64, device=CPU)
    for ab in training_ab(shards, split, images):
        counts += torch.bincount(nearest_bin(ab, bins).flatten(), minlength=bins.shape[0]).double()
    return counts


def cell_index(ab: Tensor, grid: int, ab_range: int) -> Tensor:
    """ab [..., 2, H, W] -> long [..., H, W]: the row of `full_grid` of each pixel's cell (its ab rounded to
    the grid, clamped to the range)."""
    side = 2 * ab_range // grid + 1
    cells = (quantize_ab(ab, grid) / grid + ab_range // grid).long().clamp(0, side - 1)
    return cells[..., 0, :, :] * side + cells[..., 1, :, :]


@lru_cache(maxsize=4)
def _data_bins(shards: str, split: str, images: int, grid: int, ab_range: int) -> tuple[Tensor, Tensor]:
    cells = full_grid(grid, ab_range)
    counts = torch.zeros(cells.shape[0], dtype=torch.float64, device=CPU)
    for ab in training_ab(shards, split, images):
        counts += torch.bincount(cell_index(ab, grid, ab_range).flatten(), minlength=cells.shape[0]).double()
    occupied = counts > 0
    return cells[occupied], counts[occupied]


def data_bins(shards: str, split: str, images: int, grid: int, ab_range: int) -> tuple[Tensor, Tensor]:
    """([Q, 2] centers, float64 [Q] pixel counts) of the cells the first `images` training images occupy, in
    `full_grid` order (a major, b minor). One pass, cached per process: the FLOP count and the build share it."""
    bins, counts = _data_bins(shards, split, images, grid, ab_range)
    return bins.clone(), counts.clone()


# ---------------------------------------------------------------------- the networks


def token_decoder(width: int, hidden_dim: int, outputs: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(width, outputs)
    return nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, outputs))


Backbone = VisionTransformer | ResNet


def dense_head(net: Backbone, downsample: int, classes: int, hidden_dim: int, conv_width: int) -> nn.Module:
    """Logits over `classes` at 1/downsample of the input: per token for each cell of its patch (ViT), or
    up-convolutions from the feature map (ResNet)."""
    if isinstance(net, ResNet):
        stages = (net.stride // downsample).bit_length() - 1
        return UpsamplingDecoder(net.embed_dim, classes, stages, conv_width)
    return token_decoder(net.embed_dim, hidden_dim, (net.patch_size // downsample) ** 2 * classes)


def dense_logits(net: Backbone, head: nn.Module, x: Tensor, downsample: int, classes: int) -> Tensor:
    """[B, classes, H / downsample, W / downsample]."""
    if isinstance(net, ResNet):
        return head(net.forward_feature_map(x))
    tokens = net.patch_tokens(net.forward_tokens(x))
    return unpatchify(head(tokens), net.patch_size // downsample, classes)


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
        l_net: Backbone,
        ab_net: Backbone | None,
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
        pooling = {} if pool is None else {"pool": pool}  # each backbone's own default
        features = self.l_net.forward_features(l_input(lab), **pooling)
        if self.ab_net is None:
            return features
        return torch.cat([features, self.ab_net.forward_features(ab_input(lab, self.ab_range), **pooling)], dim=1)

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)


class Colorization(Method):
    num_visuals = 8

    def __init__(
        self,
        l_net: Backbone,
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
        ab_net: Backbone | None = None,
        l_bins: int = 50,
        conv_decoder_width: int = 256,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.encoder = LabEncoder(l_net, ab_net, ab_range, mean, std)
        self.grid, self.ab_range, self.soft_neighbors, self.soft_sigma = grid, ab_range, soft_neighbors, soft_sigma
        self.prior_sigma, self.rebalance, self.temperature = prior_sigma, rebalance, temperature
        self.downsample, self.l_bins = downsample, l_bins
        bins_count = bins.shape[0]
        self.ab_decoder = dense_head(l_net, downsample, bins_count, decoder_hidden_dim, conv_decoder_width)
        self.l_decoder = (
            dense_head(ab_net, downsample, l_bins, decoder_hidden_dim, conv_decoder_width)
            if ab_net is not None
            else None
        )
        # The tables computed at build (bins and prior from the training data or the gamut), copied into the
        # persistent buffers by init_weights (also after a meta-device build).
        self._tables = (bins.detach().to(CPU, torch.float32).clone(), prior.detach().to(CPU, torch.float64).clone())
        self.register_buffer("bins", torch.zeros(bins_count, 2))
        self.register_buffer("prior", torch.zeros(bins_count))  # the empirical prior p (sum 1)
        self.register_buffer("smoothed_prior", torch.zeros(bins_count))  # p~
        self.register_buffer("class_weights", torch.zeros(bins_count))  # w
        self.init_weights()

    @property
    def l_net(self) -> Backbone:
        return self.encoder.l_net

    @property
    def ab_net(self) -> Backbone | None:
        return self.encoder.ab_net

    @torch.no_grad()
    def init_weights(self) -> None:
        for net in (self.l_net, self.ab_net):
            if net is not None:
                net.init_weights()
        for decoder in (self.ab_decoder, self.l_decoder):
            if isinstance(decoder, UpsamplingDecoder):
                decoder.init_weights()
            elif decoder is not None:
                decoder.apply(init_linear_and_norm)
        bins, counts = self._tables
        prior = counts / counts.sum()
        smoothed = gaussian_smooth_on_grid(prior, bins.double(), self.grid, self.ab_range, self.prior_sigma)
        p_tilde, weights = rebalance_weights(prior, smoothed, self.rebalance)
        for name, value in (("bins", bins), ("prior", prior), ("smoothed_prior", p_tilde), ("class_weights", weights)):
            getattr(self, name).copy_(value.to(torch.float32))

    def inference_network(self) -> LabEncoder:
        return self.encoder

    def transformer_blocks(self) -> list:
        return [block for net in (self.l_net, self.ab_net) if net is not None for block in backbone_blocks(net)]

    def no_weight_decay(self) -> set[str]:
        names = backbone_no_weight_decay(self.l_net, "encoder.l_net")
        if self.ab_net is not None:
            names |= backbone_no_weight_decay(self.ab_net, "encoder.ab_net")
        return names

    def predict_ab_logits(self, lab: Tensor) -> Tensor:
        """[B, Q, H / downsample, W / downsample] ab-bin logits from the L channel."""
        return dense_logits(self.l_net, self.ab_decoder, l_input(lab), self.downsample, self.bins.shape[0])

    def predict_l_logits(self, lab: Tensor) -> Tensor:
        """Split-brain: [B, l_bins, H / downsample, W / downsample] L-bin logits from ab."""
        x = ab_input(lab, self.ab_range)
        return dense_logits(self.ab_net, self.l_decoder, x, self.downsample, self.l_bins)

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
    validate_backbone(cfg)
    c = cfg.method.colorization
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: colorization uses one crop per image, got {cfg.data.local_crops}")
    if cfg.model.in_chans != 3:
        raise ConfigError(f"model.in_chans: colorization converts RGB images to Lab, needs 3, got {cfg.model.in_chans}")
    if c.ab_range % c.grid:
        raise ConfigError(
            f"method.colorization.grid: {c.grid} does not divide method.colorization.ab_range {c.ab_range}"
        )
    if cfg.model.arch == "vit" and cfg.model.patch_size % c.downsample:
        raise ConfigError(
            f"method.colorization.downsample: {c.downsample} does not divide model.patch_size {cfg.model.patch_size}"
        )
    if cfg.model.arch != "vit":
        stride = resnet_stride(cfg)
        if stride % c.downsample:
            raise ConfigError(
                f"method.colorization.downsample: the head up-convolves the ResNet's 1/{stride} feature map by "
                f"factors of 2, so {c.downsample} must divide {stride} (model.resnet_stem={cfg.model.resnet_stem!r})"
            )
        if cfg.data.image_size % stride:
            raise ConfigError(
                f"data.image_size: {cfg.data.image_size} px is not a multiple of the ResNet's stride {stride} "
                f"(model.resnet_stem={cfg.model.resnet_stem!r}), so its feature map does not tile the input"
            )
    if c.bins == "data" and not c.prior_images:
        raise ConfigError(
            "method.colorization.bins: 'data' takes the bins the training pixels occupy, but "
            "method.colorization.prior_images = 0 counts none; set prior_images > 0 or bins = 'gamut'"
        )
    if c.bins == "gamut":
        check_soft_neighbors(c.soft_neighbors, len(_gamut_bins(c.grid, c.ab_range)), "in-gamut")


def check_soft_neighbors(neighbors: int, bins: int, kind: str) -> None:
    if neighbors > bins:
        raise ConfigError(f"method.colorization.soft_neighbors: {neighbors} > the {bins} {kind} bins")


def bins_and_counts(cfg: Config) -> tuple[Tensor, Tensor]:
    """The bin centers and the prior's pixel counts the config asks for (see the module's docstring)."""
    c = cfg.method.colorization
    if c.bins == "data":
        bins, counts = data_bins(cfg.data.shards, cfg.data.split, c.prior_images, c.grid, c.ab_range)
        check_soft_neighbors(c.soft_neighbors, len(bins), "occupied")
        return bins, counts
    bins = gamut_bins(c.grid, c.ab_range)
    if c.prior_images:
        return bins, count_prior(cfg.data.shards, cfg.data.split, c.prior_images, bins)
    return bins, torch.ones(bins.shape[0], dtype=torch.float64, device=CPU)


def bin_count(cfg: Config) -> int:
    c = cfg.method.colorization
    return len(bins_and_counts(cfg)[0]) if c.bins == "data" else len(_gamut_bins(c.grid, c.ab_range))


def build(cfg: Config) -> Colorization:
    c = cfg.method.colorization
    bins, counts = bins_and_counts(cfg)
    ab_net = build_backbone(with_in_chans(cfg, 2)) if c.split_brain else None
    return Colorization(
        build_backbone(with_in_chans(cfg, 1)),
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
        c.conv_decoder_width,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def head_flops(cfg: Config, classes: int) -> float:
    c, size = cfg.method.colorization, cfg.data.image_size
    if cfg.model.arch != "vit":
        stride = resnet_stride(cfg)
        stages = (stride // c.downsample).bit_length() - 1
        return upsampling_decoder_flops(backbone_width(cfg), classes, size // stride, stages, c.conv_decoder_width)
    tokens = (size // cfg.model.patch_size) ** 2
    outputs = (cfg.model.patch_size // c.downsample) ** 2 * classes
    width = vit_width(cfg)
    dims = [width, c.decoder_hidden_dim, outputs] if c.decoder_hidden_dim else [width, outputs]
    return sum(linear_flops(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))


def flops(cfg: Config) -> FlopCount:
    """The L network and its head (and for split-brain the ab network and its head); the Lab conversion and
    the soft encoding are elementwise or small and left out. With `bins = "data"` the head's size is counted
    on the training shards (the same cached pass the build uses)."""
    c, size = cfg.method.colorization, cfg.data.image_size
    total = backbone_flops(with_in_chans(cfg, 1), size) + FlopCount(head_flops(cfg, bin_count(cfg)))
    if c.split_brain:
        total = total + backbone_flops(with_in_chans(cfg, 2), size) + FlopCount(head_flops(cfg, c.l_bins))
    return total


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample (ViT only): the L network and its decoder (a copy of the patch tokens, and GELU's input and
    output for an MLP), the fp32 log-softmax over the Q bins and the soft targets it is multiplied by, and
    each predicted pixel's class weight; split-brain adds the ab network, its decoder, the log-softmax over
    the L bins and the int64 targets."""
    if cfg.model.arch != "vit":  # the conv decoder's activations are not modelled yet
        raise ConfigError(f"model.arch: pretrain plan has no activation model of colorization on {cfg.model.arch!r}")
    c, size = cfg.method.colorization, cfg.data.image_size
    cells = (size // c.downsample) ** 2
    decoder = (size // cfg.model.patch_size) ** 2 * (vit_width(cfg) + 2 * c.decoder_hidden_dim) * act
    parts = {
        f"L network {k}": v for k, v in encoder_activations(with_in_chans(cfg, 1), size, 1, act, checkpointing).items()
    }
    parts["ab decoder"] = decoder
    parts["ab loss"] = (2 * bin_count(cfg) + 1) * cells * STAT
    if c.split_brain:
        ab_net = encoder_activations(with_in_chans(cfg, 2), size, 1, act, checkpointing)
        parts |= {f"ab network {k}": v for k, v in ab_net.items()}
        parts["L decoder"] = decoder
        parts["L loss"] = cells * (c.l_bins * STAT + INDEX)
    return parts


def synthetic_overrides(cfg: Config) -> list[str]:
    """Without shards there are no pixels to count the bins and the prior on: the gamut's bins, a uniform prior."""
    c = cfg.method.colorization
    overrides = ["method.colorization.prior_images=0"] if c.prior_images else []
    return overrides + (["method.colorization.bins=gamut"] if c.bins == "data" else [])


# One random resized crop (and flip) per image, as the paper's training crops; Lab is computed in `forward`.
SPEC = MethodSpec(
    "colorization",
    ColorizationConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
    synthetic_overrides=synthetic_overrides,
)
