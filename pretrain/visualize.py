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


def _principal_components(x: Tensor, k: int) -> Tensor:
    """Projections [M, k] of the rows of x [M, D] on their k leading principal directions."""
    centered = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centered, full_matrices=False)
    return centered @ vh[:k].T


def patch_pca_rgb(patches: Tensor, threshold: float = 0.0) -> tuple[Tensor, Tensor]:
    """DINOv2's pictures of patch features (Oquab et al. 2024, figure 1): patches [N, h, w, D] of N images ->
    (RGB maps [N, 3, h, w] in 0..1, foreground mask [N, h, w]).

    A PCA over the patches of all N images together; the first component, thresholded at `threshold`,
    separates foreground from background. Its sign is arbitrary, so it is flipped to make the border patches
    (mostly background in object-centred images) fall below the threshold on average. A second PCA over the
    foreground patches alone gives three components, each min-max scaled to 0..1, shown as R, G and B;
    background patches are black."""
    if patches.ndim != 4:
        raise ValueError(f"patch_pca_rgb expects patches [N, h, w, D], got {tuple(patches.shape)}")
    num, height, width, dim = patches.shape
    flat = patches.detach().float().reshape(-1, dim)
    first = _principal_components(flat, 1)[:, 0].reshape(num, height, width)
    border = torch.ones(height, width, dtype=torch.bool)
    border[1:-1, 1:-1] = False
    inner = first[:, ~border].mean() if (~border).any() else first.new_zeros(())
    if first[:, border].mean() > inner:
        first = -first
    foreground = first > threshold
    rgb = torch.zeros(num, height, width, 3)
    chosen = flat[foreground.reshape(-1)]
    if chosen.shape[0] >= 2:
        k = min(3, chosen.shape[0], dim)
        components = _principal_components(chosen, k)
        low, high = components.amin(dim=0), components.amax(dim=0)
        scaled = (components - low) / (high - low).clamp_min(1e-12)
        rgb[foreground, :k] = scaled
    return rgb.permute(0, 3, 1, 2).contiguous(), foreground


@torch.no_grad()
def pca_grid(
    encoder: torch.nn.Module, images: Tensor, mean: Sequence[float], std: Sequence[float]
) -> tuple[Tensor, Tensor]:
    """(uint8 [H', W', 3] picture, foreground [N, h, w]): the `images` (normalized as the encoder reads them) in
    one row, the `patch_pca_rgb` maps of a ViT encoder's patch features below them, upsampled to the image size."""
    grid_h, grid_w = images.shape[-2] // encoder.patch_size, images.shape[-1] // encoder.patch_size
    patches = encoder.patch_tokens(encoder.forward_tokens(images)).reshape(len(images), grid_h, grid_w, -1)
    rgb, foreground = patch_pca_rgb(patches.cpu())
    maps = torch.nn.functional.interpolate(rgb, size=images.shape[-2:], mode="nearest")
    picture = image_grid(torch.cat([denormalize(images.float(), mean, std).cpu(), maps]), nrow=len(images))
    return picture, foreground
