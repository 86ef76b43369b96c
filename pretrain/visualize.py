"""Turning image batches into one uint8 picture that experiment trackers can store."""

from collections.abc import Sequence

import torch
from torch import Tensor


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo per-channel (x - mean) / std on [N, C, H, W] and clamp to the displayable range 0..1."""
    mean_t = torch.tensor(mean, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=images.dtype, device=images.device).reshape(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def image_grid(images: Tensor, nrow: int, padding: int = 2) -> Tensor:
    """Tile [N, C, H, W] floats in 0..1 into one uint8 [H', W', 3] image with `nrow` images per row.

    Grayscale is repeated to RGB because image loggers (MLflow, PIL) expect 3 channels.
    """
    num, channels, height, width = images.shape
    if channels not in (1, 3):
        raise ValueError(f"image_grid needs 1 or 3 channels, got {channels}")
    images = images.detach().float().clamp(0.0, 1.0).expand(-1, 3, -1, -1).cpu()
    ncol = min(nrow, num)
    nrows = -(-num // ncol)
    cell_h, cell_w = height + padding, width + padding
    grid = torch.zeros(3, nrows * cell_h + padding, ncol * cell_w + padding)
    for index, image in enumerate(images):
        top = padding + (index // ncol) * cell_h
        left = padding + (index % ncol) * cell_w
        grid[:, top : top + height, left : left + width] = image
    return (grid * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()


def match_grid(queries: Tensor, matches: Tensor, correct: Tensor) -> Tensor:
    """Two rows of images in 0..1: each query above the image retrieved for it, framed green where that is
    the right one (the query's other view) and red otherwise: how contrastive methods show what they learned."""
    found = matches.float().expand(-1, 3, -1, -1).clone()
    color = torch.where(
        correct[:, None].to(found.device), found.new_tensor([0.0, 0.8, 0.0]), found.new_tensor([0.9, 0.0, 0.0])
    )
    frame = color[:, :, None, None]
    found[:, :, :2, :] = frame
    found[:, :, -2:, :] = frame
    found[:, :, :, :2] = frame
    found[:, :, :, -2:] = frame
    return image_grid(torch.cat([queries.float().expand(-1, 3, -1, -1), found]), nrow=len(found))
