"""Jigsaw puzzles (Noroozi & Favaro 2016, "Unsupervised Learning of Visual Representations by Solving Jigsaw
Puzzles"): a crop is cut into a 3x3 grid of tiles with gaps and a jitter per tile, the tiles are shuffled by
one of P permutations, and a network that sees each tile through one shared encoder names the permutation.

The permutation set is the paper's greedy maximal-minimum-Hamming-distance selection, drawn from
`method.jigsaw.permutation_seed`; it is a persistent buffer of the method, so it is saved in every
checkpoint and a resumed or evaluated run uses exactly the set it trained with. Each tile is normalized on
its own (mean and std per channel), as the paper does, so tiles cannot be placed by their brightness.

The paper's tile encoder is AlexNet up to fc6; here it is the `model.*` ViT applied to each tile (its
position table resampled to the tile's size), and the head concatenates the 9 pooled tile features into an
MLP over the P classes (the paper's fc7 and fc8). kNN and the linear probe evaluate the ViT on whole images.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

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
from pretrain.methods.tiles import (
    assemble_tiles,
    extract_tiles,
    normalize_each_tile,
    tile_origins,
    validate_tile_grid,
)
from pretrain.models.heads import classifier_head
from pretrain.models.resnet import ResNet
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VisionTransformer
from pretrain.visualize import denormalize, image_grid


@dataclass
class JigsawConfig:
    """method.jigsaw"""

    # Tiles per side: grid x grid tiles (all (grid^2)! orders are enumerated, so at most 3).
    grid: int = bounded(3, ge=2)
    # Side of a tile in pixels, a multiple of model.patch_size (ViT), at least the ResNet's stride (8 or 32).
    tile_size: int = bounded(64, gt=0)
    # Nominal pixels between neighbouring tiles.
    gap: int = bounded(11, ge=0)
    # Each tile moves by up to this many pixels per axis, independently.
    jitter: int = bounded(5, ge=0)
    # The size P of the permutation set (the classes).
    permutations: int = bounded(100, ge=2)
    # Seed of the greedy selection's random first permutation and tie breaks.
    permutation_seed: int = 0
    # Width of the hidden layer over the concatenated tile features; 0: one linear layer.
    head_hidden_dim: int = bounded(0, ge=0)
    # What each tile contributes: the cls token | the mean of its patch tokens.
    pool: FeaturePool = "mean"
    # Normalize each tile's mean and std on its own (the paper's guard against low-level shortcuts).
    normalize_tiles: bool = True


@lru_cache(maxsize=2)
def all_permutations(tiles: int) -> Tensor:
    """[tiles!, tiles] every order of `tiles` items, in lexicographic order."""
    return torch.tensor(list(itertools.permutations(range(tiles))), dtype=torch.uint8, device="cpu")


def maximal_hamming_permutations(count: int, tiles: int, seed: int) -> Tensor:
    """[count, tiles] long: the paper's greedy selection (its Algorithm 1, "maximal" variant). Start from a random
    permutation; then repeatedly add the permutation whose minimum Hamming distance to those already chosen is
    largest, ties broken at random. The random choices come from `seed` alone, so the set is reproducible."""
    return _greedy_selection(count, tiles, seed).clone()


@lru_cache(maxsize=4)
def _greedy_selection(count: int, tiles: int, seed: int) -> Tensor:  # seconds for 9 tiles: build once per process
    candidates = all_permutations(tiles)
    if count > len(candidates):
        raise ValueError(f"{count} permutations requested, but only {len(candidates)} exist for {tiles} tiles")
    generator = torch.Generator().manual_seed(seed)
    chosen = [int(torch.randint(len(candidates), (1,), generator=generator))]
    nearest = (candidates != candidates[chosen[0]]).sum(dim=1)  # distance to the closest chosen permutation
    for _ in range(count - 1):
        best = (nearest == nearest.max()).nonzero().flatten()
        pick = int(best[torch.randint(len(best), (1,), generator=generator)])
        chosen.append(pick)
        nearest = torch.minimum(nearest, (candidates != candidates[pick]).sum(dim=1))
    return candidates[chosen].long()


class JigsawPuzzles(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        image_size: int,
        grid: int = 3,
        tile_size: int = 64,
        gap: int = 11,
        jitter: int = 5,
        permutations: int = 100,
        permutation_seed: int = 0,
        head_hidden_dim: int = 0,
        pool: str = "mean",
        normalize_tiles: bool = True,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.image_size, self.grid, self.tile_size, self.gap, self.jitter = image_size, grid, tile_size, gap, jitter
        self.num_permutations, self.permutation_seed = permutations, permutation_seed
        self.head = classifier_head(grid * grid * backbone.embed_dim, head_hidden_dim, permutations)
        self.pool, self.normalize_tiles = pool, normalize_tiles
        self.image_mean, self.image_std = mean, std
        # Saved with every checkpoint: evaluation and resume read the set the run trained with.
        self.register_buffer("permutations", torch.zeros(permutations, grid * grid, dtype=torch.long))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.apply(init_linear_and_norm)
        chosen = maximal_hamming_permutations(self.num_permutations, self.grid * self.grid, self.permutation_seed)
        self.permutations.copy_(chosen)

    def cut(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """[B, C, H, W] -> the grid's tiles [B, N, C, t, t] in row-major order, jittered."""
        origins = tile_origins(
            images.shape[0], self.image_size, self.grid, self.tile_size, self.gap, self.jitter, images.device, generator
        )
        return extract_tiles(images, origins, self.tile_size)

    def shuffle(self, tiles: Tensor, labels: Tensor) -> Tensor:
        """Position i of puzzle b holds tile permutations[labels[b], i]."""
        order = self.permutations[labels]
        return tiles.gather(1, order[:, :, None, None, None].expand_as(tiles))

    def logits(self, shuffled: Tensor) -> Tensor:
        batch, tiles = shuffled.shape[:2]
        if self.normalize_tiles:
            shuffled = normalize_each_tile(shuffled)
        features = self.backbone.forward_features(shuffled.flatten(0, 1), self.pool)
        return self.head(features.reshape(batch, tiles * features.shape[-1]))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        labels = torch.randint(self.num_permutations, (images.shape[0],), device=images.device)
        logits = self.logits(self.shuffle(self.cut(images), labels)).float()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "jigsaw_accuracy": accuracy.detach()}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: shuffled puzzles. Bottom row: the same tiles put back by the *predicted* permutation, framed
        green where it is the right one and red where not. Fixed-seed jitter and permutations, so pictures
        compare across steps."""
        images = batch["image"][: self.num_visuals]
        generator = torch.Generator(device=images.device).manual_seed(0)
        tiles = self.cut(images, generator)
        labels = torch.randint(self.num_permutations, (len(images),), device=images.device, generator=generator)
        shuffled = self.shuffle(tiles, labels)
        predicted = self.logits(shuffled).argmax(dim=-1)
        show = denormalize(shuffled.flatten(0, 1).float(), self.image_mean, self.image_std)
        show = show.reshape(*shuffled.shape[:3], *show.shape[-2:]).expand(-1, -1, 3, -1, -1)
        # Position i holds tile order[i]: send it back to where the predicted permutation says it came from.
        order = self.permutations[predicted][:, :, None, None, None].expand_as(show)
        solved = torch.empty_like(show).scatter_(1, order, show)
        right = (predicted == labels)[:, None]
        colors = torch.where(right, show.new_tensor([0.0, 0.8, 0.0]), show.new_tensor([0.9, 0.0, 0.0]))
        top = assemble_tiles(show, self.grid, gap=2)
        bottom = assemble_tiles(solved, self.grid, gap=2, frame=colors)
        return {"jigsaw": image_grid(torch.cat([top, bottom]), nrow=len(images))}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    validate_pool(cfg, cfg.method.jigsaw.pool, "method.jigsaw.pool")
    jigsaw = cfg.method.jigsaw
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: jigsaw puzzles use one crop per image, got {cfg.data.local_crops}")
    if jigsaw.grid > 3:
        raise ConfigError(
            f"method.jigsaw.grid: the greedy selection enumerates all (grid^2)! orders; at most 3, got {jigsaw.grid}"
        )
    tiles = jigsaw.grid * jigsaw.grid
    if jigsaw.permutations > math.factorial(tiles):
        raise ConfigError(
            f"method.jigsaw.permutations: {jigsaw.permutations} is more than the {math.factorial(tiles)} orders "
            f"of a {jigsaw.grid}x{jigsaw.grid} grid"
        )
    validate_backbone_input(cfg, cfg.method.jigsaw.tile_size, "method.jigsaw.tile_size")
    validate_tile_grid(
        cfg.data.image_size,
        jigsaw.grid,
        jigsaw.tile_size,
        jigsaw.gap,
        jigsaw.jitter,
        "method.jigsaw",
    )


def build(cfg: Config) -> JigsawPuzzles:
    j = cfg.method.jigsaw
    return JigsawPuzzles(
        build_backbone(cfg),
        cfg.data.image_size,
        j.grid,
        j.tile_size,
        j.gap,
        j.jitter,
        j.permutations,
        j.permutation_seed,
        j.head_hidden_dim,
        j.pool,
        j.normalize_tiles,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """The encoder on each of the grid^2 tiles and the head on their concatenated features."""
    j = cfg.method.jigsaw
    tiles = j.grid * j.grid
    dims = [tiles * backbone_width(cfg), j.head_hidden_dim, j.permutations] if j.head_hidden_dim else None
    head = mlp_flops(dims or [tiles * backbone_width(cfg), j.permutations])
    one = backbone_flops(cfg, j.tile_size)
    return FlopCount(tiles * one.trained + head, tiles * one.frozen)


# One random resized crop (and flip) per image; tiles, jitter and the permutation are drawn in `forward`.
def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the encoder on each tile, the head and the cross-entropy."""
    j = cfg.method.jigsaw
    parts = encoder_activations(cfg, j.tile_size, j.grid**2, act, checkpointing)
    parts["head and loss"] = classifier_head_activations(
        j.grid**2 * backbone_width(cfg), j.head_hidden_dim, j.permutations, act
    )
    return parts


SPEC = MethodSpec(
    "jigsaw",
    JigsawConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
)
