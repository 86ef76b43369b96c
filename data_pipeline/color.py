"""Photometric augmentations on float RGB batches [B, 3, H, W] in [0, 1], with one parameter per sample.

The same functions serve both places augmentation can run: per sample in the data workers (a batch of
one) and batched on the device after transfer. Formulas follow the usual definitions (torchvision's
ColorJitter / GaussianBlur / Solarize and PIL's ImageEnhance): blends toward a degenerate image for
brightness, contrast and saturation, a rotation in HSV space for hue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's "L" conversion


def _per_sample(values: Tensor, x: Tensor) -> Tensor:
    return values.to(x.dtype).view(-1, 1, 1, 1)


def grayscale(x: Tensor) -> Tensor:
    """[B, 1, H, W] luma."""
    weights = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    """factor * x + (1 - factor) * other, clipped to [0, 1]: factor 1 is the identity."""
    f = _per_sample(factor, x)
    return (f * x + (1 - f) * other).clamp_(0, 1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, torch.zeros_like(x), factor)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = grayscale(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean.expand_as(x), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    return _blend(x, grayscale(x).expand_as(x), factor)


def rgb_to_hsv(x: Tensor) -> Tensor:
    r, g, b = x.unbind(dim=1)
    maxc, _ = x.max(dim=1)
    minc, _ = x.min(dim=1)
    delta = maxc - minc
    safe_delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    rc, gc, bc = (maxc - r) / safe_delta, (maxc - g) / safe_delta, (maxc - b) / safe_delta
    hue = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.where(delta > 0, (hue / 6.0) % 1.0, torch.zeros_like(hue))
    return torch.stack([hue, sat, maxc], dim=1)


def hsv_to_rgb(x: Tensor) -> Tensor:
    hue, sat, val = x.unbind(dim=1)
    sector = torch.floor(hue * 6.0)
    frac = hue * 6.0 - sector
    sector = sector.long() % 6
    p, q, t = val * (1 - sat), val * (1 - sat * frac), val * (1 - sat * (1 - frac))
    # (r, g, b) for sectors 0..5
    choices = torch.stack(
        [
            torch.stack([val, t, p], dim=1),
            torch.stack([q, val, p], dim=1),
            torch.stack([p, val, t], dim=1),
            torch.stack([p, q, val], dim=1),
            torch.stack([t, p, val], dim=1),
            torch.stack([val, p, q], dim=1),
        ],
        dim=0,
    )  # [6, B, 3, H, W]
    index = sector.unsqueeze(0).unsqueeze(2).expand(1, -1, 3, -1, -1)
    return choices.gather(0, index).squeeze(0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate hue by `shift` turns (in [-0.5, 0.5]); 0 is the identity."""
    hsv = rgb_to_hsv(x)
    hue = (hsv[:, 0] + shift.to(x.dtype).view(-1, 1, 1)) % 1.0
    return hsv_to_rgb(torch.stack([hue, hsv[:, 1], hsv[:, 2]], dim=1)).clamp_(0, 1)


def gaussian_blur(x: Tensor, sigma: Tensor, kernel_size: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma and reflected borders."""
    if kernel_size < 3 or kernel_size % 2 == 0:
        raise ValueError(f"gaussian_blur kernel_size must be odd and >= 3, got {kernel_size}")
    batch, channels, height, width = x.shape
    radius = kernel_size // 2
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma.to(x.dtype).view(-1, 1) ** 2))
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)  # [B*C, k]
    flat = x.reshape(1, batch * channels, height, width)
    flat = F.pad(flat, (radius, radius, 0, 0), mode="reflect" if width > radius else "replicate")
    flat = F.conv2d(flat, kernel.view(-1, 1, 1, kernel_size), groups=batch * channels)
    flat = F.pad(flat, (0, 0, radius, radius), mode="reflect" if height > radius else "replicate")
    flat = F.conv2d(flat, kernel.view(-1, 1, kernel_size, 1), groups=batch * channels)
    return flat.view(batch, channels, height, width)


def solarize(x: Tensor, threshold: float = 0.5) -> Tensor:
    """Invert every value at or above `threshold`."""
    return torch.where(x >= threshold, 1.0 - x, x)


def blur_kernel_size(image_size: int) -> int:
    """About a tenth of the image side, odd (23 at 224 px, as the MoCo v3 / DINO recipes use)."""
    size = max(3, int(0.1 * image_size))
    return size if size % 2 else size + 1
