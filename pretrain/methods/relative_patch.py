"""Relative patch location (Doersch, Gupta, Efros 2015, "Unsupervised Visual Representation Learning by Context
Prediction"): a center patch and one of its 8 neighbours in a 3x3 layout, with a gap between them and a random
jitter of each patch, go through one shared encoder; a head on the two features names where the neighbour is
(8 ways).

The paper found a trivial shortcut: lenses' chromatic aberration shifts green against magenta toward the edges
of a photo, so a network can locate a patch in the frame from its color fringes. Its two guards are options
(`method.relative_patch.chroma`): "projection" removes every pixel's green-magenta component (colors shift
toward gray), "drop" keeps one random color channel per patch and replaces the other two by Gaussian noise
of 1/100 of the kept channel's std.

The paper's encoder is AlexNet-style up to fc6 on each patch and fc7/fc8 on the pair; here the encoder is the
`model.*` ViT on each patch and the head an MLP on the two concatenated pooled features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.flops import FlopCount, mlp_flops
from pretrain.methods.backbone import (
    EncoderHooks,
    backbone_flops,
    backbone_width,
    build_backbone,
    classifier_head_activations,
    encoder_activations,
    validate_backbone,
    validate_backbone_input,
    validate_pool,
)
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.methods.tiles import assemble_tiles, extract_tiles, tile_origins, validate_tile_grid
from pretrain.models.heads import classifier_head
from pretrain.models.resnet import ResNet
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VisionTransformer
from pretrain.visualize import denormalize, image_grid

POSITIONS = 8
# Label k -> the neighbour's index in the row-major 3x3 grid (4 is the center): 0 top-left ... 7 bottom-right.
NEIGHBOUR_CELLS = (0, 1, 2, 3, 5, 6, 7, 8)
CENTER_CELL = 4
# The green-magenta axis in RGB: green up, red and blue (magenta) down.
GREEN_MAGENTA = (-1.0, 2.0, -1.0)
ChromaGuard = Literal["none", "projection", "drop"]


@dataclass
class RelativePatchConfig:
    """method.relative_patch"""

    # Side of each patch in pixels, a multiple of model.patch_size (ViT), at least the ResNet's stride (8 or 32).
    tile_size: int = bounded(96, gt=0)
    # Pixels between the center patch and its neighbours.
    gap: int = bounded(48, ge=0)
    # Each patch moves by up to this many pixels per axis, independently.
    jitter: int = bounded(7, ge=0)
    # The guard against chromatic aberration: none | projection | drop (see the module's docstring).
    chroma: ChromaGuard = "projection"
    # Width of the hidden layer over the two concatenated features; 0: one linear layer.
    head_hidden_dim: int = bounded(0, ge=0)
    # What each patch contributes: the cls token | the mean of its patch tokens.
    pool: FeaturePool = "mean"


def sample_pairs(
    batch: int,
    image_size: int,
    tile: int,
    gap: int,
    jitter: int,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(origins [B, 2, 2]: top-left (row, col) of the center patch and of the neighbour, labels [B] in 0..7)."""
    origins = tile_origins(batch, image_size, 3, tile, gap, jitter, device, generator)
    labels = torch.randint(POSITIONS, (batch,), device=device, generator=generator)
    cells = torch.stack([torch.full_like(labels, CENTER_CELL), labels.new_tensor(NEIGHBOUR_CELLS)[labels]], dim=1)
    return origins.gather(1, cells[..., None].expand(-1, -1, 2)), labels


def project_out_green_magenta(pixels: Tensor) -> Tensor:
    """[..., 3, H, W] RGB with each pixel's component along the green-magenta axis removed (grays unchanged)."""
    axis = pixels.new_tensor(GREEN_MAGENTA)
    axis = axis / axis.norm()
    axis = axis[:, None, None]
    return pixels - (pixels * axis).sum(dim=-3, keepdim=True) * axis


def drop_colors(tiles: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """[..., C, H, W] -> one random channel per tile kept, the others Gaussian noise with 1/100 of its std."""
    flat = tiles.reshape(-1, *tiles.shape[-3:])
    keep = torch.randint(flat.shape[1], (flat.shape[0],), device=tiles.device, generator=generator)
    kept = flat[torch.arange(flat.shape[0], device=tiles.device), keep]  # [N, H, W]
    scale = 0.01 * kept.std(dim=(-2, -1), unbiased=False)
    noise = torch.randn(flat.shape, device=tiles.device, dtype=tiles.dtype, generator=generator)
    noise = noise * scale[:, None, None, None]
    chosen = F.one_hot(keep, flat.shape[1]).to(torch.bool)[:, :, None, None]
    return torch.where(chosen, flat, noise).reshape(tiles.shape)


class RelativePatchLocation(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        image_size: int,
        tile_size: int = 96,
        gap: int = 48,
        jitter: int = 7,
        chroma: str = "projection",
        head_hidden_dim: int = 0,
        pool: str = "mean",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = classifier_head(2 * backbone.embed_dim, head_hidden_dim, POSITIONS)
        self.image_size, self.tile_size, self.gap, self.jitter = image_size, tile_size, gap, jitter
        self.chroma, self.pool = chroma, pool
        self.image_mean, self.image_std = mean, std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.apply(init_linear_and_norm)

    def guard_colors(self, tiles: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The chromatic-aberration guard on patches [B, 2, C, t, t]; projection works on unnormalized RGB."""
        if self.chroma == "drop":
            return drop_colors(tiles, generator)
        if self.chroma == "projection":
            mean = tiles.new_tensor(self.image_mean)[:, None, None]
            std = tiles.new_tensor(self.image_std)[:, None, None]
            return (project_out_green_magenta(tiles * std + mean) - mean) / std
        return tiles

    def pairs(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(patches [B, 2, C, t, t]: center and neighbour, labels [B])."""
        size = (images.shape[0], self.image_size, self.tile_size, self.gap, self.jitter)
        origins, labels = sample_pairs(*size, images.device, generator)
        return extract_tiles(images, origins, self.tile_size), labels

    def logits(self, patches: Tensor) -> Tensor:
        features = self.backbone.forward_features(patches.flatten(0, 1), self.pool)
        return self.head(features.reshape(patches.shape[0], -1))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        patches, labels = self.pairs(batch["image"])
        logits = self.logits(self.guard_colors(patches)).float()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "location_accuracy": accuracy.detach()}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: the center patch and its neighbour where it was cut. Bottom row: the neighbour where the model
        places it, framed green where right and red where wrong. Fixed-seed draws, comparable across steps."""
        images = batch["image"][: self.num_visuals]
        generator = torch.Generator(device=images.device).manual_seed(0)
        patches, labels = self.pairs(images, generator)
        patches = self.guard_colors(patches, generator)
        predicted = self.logits(patches).argmax(dim=-1)
        shown = denormalize(patches.flatten(0, 1).float(), self.image_mean, self.image_std)
        shown = shown.reshape(*patches.shape[:2], *shown.shape[1:]).expand(-1, -1, 3, -1, -1)
        cells = shown.new_tensor(NEIGHBOUR_CELLS).long()

        def layout(where: Tensor) -> Tensor:
            grid = shown.new_zeros(len(images), 9, *shown.shape[2:])
            grid[:, CENTER_CELL] = shown[:, 0]
            grid[torch.arange(len(images)), cells[where]] = shown[:, 1]
            return grid

        right = (predicted == labels)[:, None]
        colors = torch.where(right, shown.new_tensor([0.0, 0.8, 0.0]), shown.new_tensor([0.9, 0.0, 0.0]))
        top = assemble_tiles(layout(labels), 3, gap=2)
        bottom = assemble_tiles(layout(predicted), 3, gap=2, frame=colors)
        return {"relative_patch": image_grid(torch.cat([top, bottom]), nrow=len(images))}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    validate_pool(cfg, cfg.method.relative_patch.pool, "method.relative_patch.pool")
    r = cfg.method.relative_patch
    if cfg.data.local_crops:
        raise ConfigError(
            f"data.local_crops: relative patch location uses one crop per image, got {cfg.data.local_crops}"
        )
    if r.chroma == "projection" and len(cfg.data.mean) != 3:
        raise ConfigError(
            f"method.relative_patch.chroma: projection needs RGB, data.mean has {len(cfg.data.mean)} channels"
        )
    validate_backbone_input(cfg, cfg.method.relative_patch.tile_size, "method.relative_patch.tile_size")
    validate_tile_grid(cfg.data.image_size, 3, r.tile_size, r.gap, r.jitter, "method.relative_patch")


def build(cfg: Config) -> RelativePatchLocation:
    r = cfg.method.relative_patch
    return RelativePatchLocation(
        build_backbone(cfg),
        cfg.data.image_size,
        r.tile_size,
        r.gap,
        r.jitter,
        r.chroma,
        r.head_hidden_dim,
        r.pool,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """The encoder on both patches and the head on their concatenated features."""
    r = cfg.method.relative_patch
    width = backbone_width(cfg)
    head = mlp_flops([2 * width, r.head_hidden_dim, POSITIONS] if r.head_hidden_dim else [2 * width, POSITIONS])
    one = backbone_flops(cfg, r.tile_size)
    return FlopCount(2 * one.trained + head, 2 * one.frozen)


# One random resized crop (and flip) per image; the patch pair, jitter and color guard are drawn in `forward`.
def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the encoder on each of the two patches, the head and the cross-entropy."""
    r = cfg.method.relative_patch
    parts = encoder_activations(cfg, r.tile_size, 2, act, checkpointing)
    parts["head and loss"] = classifier_head_activations(2 * backbone_width(cfg), r.head_hidden_dim, POSITIONS, act)
    return parts


SPEC = MethodSpec(
    "relative_patch",
    RelativePatchConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
)
