"""Image transforms in PIL + torch (torchvision does not work here) that draw every random number from
an explicit `torch.Generator`, so an augmented sample is a pure function of (image, generator seed).

Each stage is a callable `(x, gen) -> x`; `Compose` chains them into `(img, gen) -> FloatTensor[C, H, W]`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

X = TypeVar("X", Image.Image, torch.Tensor)


class Stage(Protocol):
    def __call__(self, x: Any, gen: torch.Generator) -> Any: ...


def _uniform(low: float, high: float, gen: torch.Generator) -> float:
    return float(torch.empty(()).uniform_(low, high, generator=gen))


def _randint(low: int, high: int, gen: torch.Generator) -> int:
    """An integer in [low, high)."""
    return int(torch.randint(low, high, (), generator=gen))


def _crop_resize(
    img: Image.Image, box: tuple[int, int, int, int], size: int, interpolation: Image.Resampling
) -> Image.Image:
    """Crop, then resize: unlike `resize(box=...)`, no pixels from outside the crop leak in at its edges."""
    return img.crop(box).resize((size, size), interpolation)


class RandomResizedCrop:
    """A crop of random area fraction `scale` and aspect `ratio`, resized to `size` x `size`.

    Same sampling as torchvision's: up to 10 tries of (area, log-uniform aspect) that fit the image,
    then a center crop clamped to `ratio`.
    """

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.2, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: Image.Resampling = Image.Resampling.BICUBIC,
    ) -> None:
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"RandomResizedCrop scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop ratio must satisfy 0 < min <= max, got {ratio}")
        self.size, self.scale, self.ratio, self.interpolation = size, scale, ratio, interpolation

    def crop_box(self, width: int, height: int, gen: torch.Generator) -> tuple[int, int, int, int]:
        """(left, top, crop_width, crop_height) of the crop within a width x height image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(self.scale[0], self.scale[1], gen)
            aspect = math.exp(_uniform(log_ratio[0], log_ratio[1], gen))
            w = round(math.sqrt(target_area * aspect))
            h = round(math.sqrt(target_area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = _randint(0, height - h + 1, gen)
                left = _randint(0, width - w + 1, gen)
                return left, top, w, h
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        left, top, w, h = self.crop_box(img.width, img.height, gen)
        return _crop_resize(img, (left, top, left + w, top + h), self.size, self.interpolation)


class RandomHorizontalFlip:
    """Mirror left-right with probability `p`; always draws one number so the stream stays aligned."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise ValueError(f"RandomHorizontalFlip p must be in [0, 1], got {p}")
        self.p = p

    def __call__(self, x: X, gen: torch.Generator) -> X:
        if _uniform(0.0, 1.0, gen) >= self.p:
            return x
        if isinstance(x, torch.Tensor):
            return x.flip(-1)
        return x.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


class CenterCropResize:
    """The central square covering `crop_fraction` of the short side, resized to `size` (eval)."""

    def __init__(
        self, size: int, crop_fraction: float = 0.875, interpolation: Image.Resampling = Image.Resampling.BICUBIC
    ) -> None:
        if not 0 < crop_fraction <= 1:
            raise ValueError(f"CenterCropResize crop_fraction must be in (0, 1], got {crop_fraction}")
        self.size, self.crop_fraction, self.interpolation = size, crop_fraction, interpolation

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> Image.Image:
        side = max(1, round(min(img.width, img.height) * self.crop_fraction))
        left, top = (img.width - side) // 2, (img.height - side) // 2
        return _crop_resize(img, (left, top, left + side, top + side), self.size, self.interpolation)


class ToTensor:
    """PIL RGB -> FloatTensor[3, H, W] in [0, 1]."""

    def __call__(self, img: Image.Image, gen: torch.Generator | None = None) -> torch.Tensor:
        pixels = np.array(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)
        return torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255.0)


class Normalize:
    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        if any(s <= 0 for s in std):
            raise ValueError(f"Normalize std must be positive, got {tuple(std)}")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        return (x - self.mean) / self.std


class Compose:
    """Stages applied in order, all drawing from the one generator."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)

    def __call__(self, img: Image.Image, gen: torch.Generator) -> torch.Tensor:
        x = img
        for stage in self.stages:
            x = stage(x, gen)
        return x


def mae_transform(
    image_size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    hflip: float = 0.5,
) -> Compose:
    """MAE pretraining: random resized crop (bicubic), horizontal flip, normalize."""
    return Compose(
        [RandomResizedCrop(image_size, scale), RandomHorizontalFlip(hflip), ToTensor(), Normalize(mean, std)]
    )


def eval_transform(
    image_size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_fraction: float = 0.875,
) -> Compose:
    """Evaluation: deterministic center crop, normalize."""
    return Compose([CenterCropResize(image_size, crop_fraction), ToTensor(), Normalize(mean, std)])
