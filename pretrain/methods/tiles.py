"""A grid of square tiles cut from each image, with a gap between neighbours and a random jitter per tile: the
geometry the patch-based pretext tasks share (jigsaw puzzles, relative patch location).

Tile (r, c) of a `grid` x `grid` layout has its nominal top-left corner at margin + (r, c) x (tile + gap), the
layout centered in the image; each tile then moves by an independent uniform integer offset in
[-jitter, jitter] per axis. The gap keeps low-level cues (edges running across the border, texture
continuity) from giving the answer away; the jitter keeps the exact spacing from doing so.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pretrain.config import ConfigError


def grid_span(grid: int, tile: int, gap: int, jitter: int) -> int:
    """Pixels the layout needs along each side, jitter room on both ends included."""
    return grid * tile + (grid - 1) * gap + 2 * jitter


def validate_tile_grid(image_size: int, grid: int, tile: int, gap: int, jitter: int, section: str) -> None:
    """The layout must fit the image (what the backbone needs of a tile is `backbone.validate_backbone_input`);
    messages name the key and sizes."""
    span = grid_span(grid, tile, gap, jitter)
    if span > image_size:
        raise ConfigError(
            f"{section}.tile_size: a {grid}x{grid} grid of {tile} px tiles with {section}.gap {gap} and "
            f"{section}.jitter {jitter} spans {span} px, more than data.image_size {image_size}"
        )


def tile_origins(
    batch: int,
    image_size: int,
    grid: int,
    tile: int,
    gap: int,
    jitter: int,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, grid * grid, 2] top-left (row, col) of every tile in row-major order, jittered with `generator` or
    torch's global one (seeded per step and micro-batch by the loop, so resume and any world size agree)."""
    stride = tile + gap
    margin = (image_size - grid_span(grid, tile, gap, 0)) // 2
    steps = torch.arange(grid, device=device) * stride + margin
    nominal = torch.stack(torch.meshgrid(steps, steps, indexing="ij"), dim=-1).reshape(1, grid * grid, 2)
    if jitter == 0:
        return nominal.expand(batch, -1, -1)
    offsets = torch.randint(-jitter, jitter + 1, (batch, grid * grid, 2), device=device, generator=generator)
    return nominal + offsets


def extract_tiles(images: Tensor, origins: Tensor, tile: int) -> Tensor:
    """images [B, C, H, W], origins [B, N, 2] -> tiles [B, N, C, tile, tile], by one gather."""
    batch = images.shape[0]
    span = torch.arange(tile, device=images.device)
    rows = origins[..., 0, None] + span  # [B, N, tile]
    cols = origins[..., 1, None] + span
    index = torch.arange(batch, device=images.device)[:, None, None, None]
    pixels = images.permute(0, 2, 3, 1)[index, rows[..., :, None], cols[..., None, :]]  # [B, N, t, t, C]
    return pixels.permute(0, 1, 4, 2, 3)


def normalize_each_tile(tiles: Tensor, eps: float = 1e-5) -> Tensor:
    """Zero mean and unit std per tile and channel, so tiles cannot be matched by their brightness or contrast
    (Noroozi & Favaro normalize every tile independently)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True, unbiased=False)
    return (tiles - mean) / (std + eps)


def assemble_tiles(tiles: Tensor, grid: int, gap: int = 1, frame: Tensor | None = None) -> Tensor:
    """[N, grid * grid, C, t, t] -> [N, C, S, S] tiles laid out row-major with `gap` px between them (for pictures),
    the border between them filled with `frame` [N, C] (a right/wrong color) or zeros."""
    num, _, channels, tile, _ = tiles.shape
    side = grid * tile + (grid + 1) * gap
    out = tiles.new_zeros(num, channels, side, side)
    if frame is not None:
        out += frame[:, :, None, None]
    for index in range(grid * grid):
        top = gap + (index // grid) * (tile + gap)
        left = gap + (index % grid) * (tile + gap)
        out[:, :, top : top + tile, left : left + tile] = tiles[:, index]
    return out
