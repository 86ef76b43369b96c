"""What a DiT or VAE training sample is: images mapped to [-1, 1], or a latent drawn from its stored posterior."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor

from data_pipeline.augment import CenterCropResize, RandomHorizontalFlip, RandomResizedCrop, ToTensor


def to_signed(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range diffusion models and VAEs work in."""
    return x * 2 - 1


def to_unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped, for pictures."""
    return ((x + 1) / 2).clamp(0, 1)


def crop_and_flip(
    size: int, scale: tuple[float, float] = (1.0, 1.0), hflip: float = 0.0, train: bool = True
) -> Callable[[Image.Image, torch.Generator], Image.Image]:
    """PIL image -> PIL image of `size`: training crops with `scale` (1, 1 keeps the whole image) and flips with
    probability `hflip`; evaluation (train=False) resizes the whole image. Generative methods' geometry."""
    crop = RandomResizedCrop(size, scale) if train and scale != (1.0, 1.0) else CenterCropResize(size, 1.0)
    flip = RandomHorizontalFlip(hflip) if train and hflip > 0 else None

    def transform(image: Image.Image, gen: torch.Generator) -> Image.Image:
        if not isinstance(image, Image.Image):
            raise TypeError(f"expected an image record, got {type(image).__name__}: are these latent shards?")
        image = crop(image, gen)
        return flip(image, gen) if flip is not None else image

    return transform


def pixel_transform(
    size: int, channels: int, scale: tuple[float, float] = (1.0, 1.0), hflip: float = 0.0, train: bool = True
) -> Callable[[Image.Image, torch.Generator], Tensor]:
    """PIL image -> [channels, size, size] in [-1, 1] (`crop_and_flip`); one channel is the mean of R, G, B."""
    geometry = crop_and_flip(size, scale, hflip, train)
    to_tensor = ToTensor()

    def transform(image: Image.Image, gen: torch.Generator) -> Tensor:
        x = to_tensor(geometry(image, gen), gen)
        if channels == 1:
            x = x.mean(dim=0, keepdim=True)
        return to_signed(x)

    return transform


def latent_transform(scale: float) -> Callable[[Tensor, torch.Generator], Tensor]:
    """Stored posterior [2, C, h, w] (mean, std) -> one scaled sample scale * (mean + std * eps).

    Sampling here, per use, keeps the VAE's posterior noise as augmentation without running its encoder.
    """

    def transform(posterior: Tensor, gen: torch.Generator) -> Tensor:
        if not isinstance(posterior, Tensor) or posterior.dim() != 4 or posterior.shape[0] != 2:
            raise TypeError("expected a latent record [2, C, h, w] (posterior mean and std): are these image shards?")
        mean, std = posterior.float()
        return scale * (mean + std * torch.randn(mean.shape, generator=gen))

    return transform
