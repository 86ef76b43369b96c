"""Augmented views for joint-embedding methods: MoCo v3's two views and DINO's multi-crop.

Geometry (crop, flip) always runs per sample in the data workers, where images still have their own
sizes. Color (jitter, grayscale, blur, solarize) runs either there too, or batched on the device after
transfer (`data.color_augment_on`); `benchmarks/augment_placement.py` measures which is faster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor

from data_pipeline.augment import Compose, Normalize, RandomHorizontalFlip, RandomResizedCrop, ToTensor
from data_pipeline.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    grayscale,
    solarize,
)

JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


@dataclass(frozen=True)
class ColorAugment:
    """Color jitter in a random order (with probability), grayscale, Gaussian blur and solarization,
    each decided per sample, as in the BYOL / MoCo v3 / DINO recipes."""

    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_prob: float = 0.8
    grayscale_prob: float = 0.2
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0
    blur_kernel: int = 23

    def sample(self, batch: int, gen: torch.Generator | None = None) -> dict[str, Tensor]:
        """Every random decision for `batch` samples, drawn from `gen` on the CPU in a fixed order."""

        def uniform(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=gen)

        b, c, s, h = self.jitter
        low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h])
        high = torch.tensor([1 + b, 1 + c, 1 + s, h])
        lo_sigma, hi_sigma = self.blur_sigma
        return {
            "jitter": uniform(batch) < self.jitter_prob,
            "factors": low + (high - low) * uniform(batch, 4),
            "order": uniform(batch, 4).argsort(dim=1),
            "grayscale": uniform(batch) < self.grayscale_prob,
            "blur": uniform(batch) < self.blur_prob,
            "sigma": lo_sigma + (hi_sigma - lo_sigma) * uniform(batch),
            "solarize": uniform(batch) < self.solarize_prob,
        }

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """x: float [B, 3, H, W] in [0, 1] -> augmented copy."""
        params = {name: value.to(x.device) for name, value in params.items()}
        x = x.clone()
        for position in range(len(JITTER_OPS)):
            for index, op in enumerate(JITTER_OPS):
                chosen = params["jitter"] & (params["order"][:, position] == index)
                if chosen.any():
                    x[chosen] = op(x[chosen], params["factors"][chosen, index])
        if (chosen := params["grayscale"]).any():
            x[chosen] = grayscale(x[chosen]).expand(-1, 3, -1, -1)
        if (chosen := params["blur"]).any():
            x[chosen] = gaussian_blur(x[chosen], params["sigma"][chosen], self.blur_kernel)
        if (chosen := params["solarize"]).any():
            x[chosen] = solarize(x[chosen])
        return x

    def __call__(self, x: Tensor, gen: torch.Generator | None = None) -> Tensor:
        return self.apply(x, self.sample(x.shape[0], gen))


class ColorStage:
    """A ColorAugment as one per-sample stage of a worker pipeline ([3, H, W] in, [3, H, W] out)."""

    def __init__(self, color: ColorAugment) -> None:
        self.color = color

    def __call__(self, x: Tensor, gen: torch.Generator) -> Tensor:
        return self.color(x.unsqueeze(0), gen).squeeze(0)


@dataclass(frozen=True)
class ViewSpec:
    size: int
    scale: tuple[float, float]
    color: ColorAugment


class MultiView:
    """One image -> a list of views (tensors), each from its own crop and color draws."""

    def __init__(
        self,
        views: Sequence[ViewSpec],
        hflip: float,
        mean: Sequence[float],
        std: Sequence[float],
        color_in_workers: bool = True,
    ) -> None:
        self.views = list(views)
        self.pipelines = [
            Compose(
                [
                    RandomResizedCrop(view.size, view.scale),
                    RandomHorizontalFlip(hflip),
                    ToTensor(),
                    *([ColorStage(view.color), Normalize(mean, std)] if color_in_workers else []),
                ]
            )
            for view in self.views
        ]

    def __call__(self, img: Image.Image, gen: torch.Generator) -> list[Tensor]:
        return [pipeline(img, gen) for pipeline in self.pipelines]


class DeviceColor:
    """The color half of a MultiView, run on whole batches after transfer: views arrive in [0, 1]
    (or as uint8 from `fast_crops.FastCrops`) and leave augmented and normalized. Random decisions come from torch's global generator, which
    the train loop seeds for every micro-batch, so runs and resumes repeat exactly."""

    def __init__(self, views: Sequence[ViewSpec], mean: Sequence[float], std: Sequence[float]) -> None:
        self.colors = [view.color for view in views]
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)

    def __call__(self, batch: dict) -> dict:
        views = batch["image"]
        if len(views) != len(self.colors):
            raise ValueError(f"expected {len(self.colors)} views, got {len(views)}")
        out = []
        for color, view in zip(self.colors, views):
            mean, std = self.mean.to(view.device), self.std.to(view.device)
            view = view.float().div_(255.0) if view.dtype == torch.uint8 else view.float()  # fast path: uint8
            out.append((color(view) - mean) / std)
        return {**batch, "image": out}


def joint_embedding_views(data, global_scale: tuple[float, float] | None = None) -> list[ViewSpec]:
    """Two global views with asymmetric blur/solarize, then `data.local_crops` small local views."""
    base = {
        "jitter": data.color_jitter,
        "jitter_prob": data.color_jitter_prob,
        "grayscale_prob": data.grayscale_prob,
        "blur_sigma": data.blur_sigma,
    }
    global_color = [
        ColorAugment(
            **base,
            blur_prob=data.blur_prob[i],
            solarize_prob=data.solarize_prob[i],
            blur_kernel=blur_kernel_size(data.image_size),
        )
        for i in range(2)
    ]
    local_color = ColorAugment(
        **base, blur_prob=data.local_blur_prob, blur_kernel=blur_kernel_size(data.local_crop_size)
    )
    scale = global_scale or data.crop_scale
    return [ViewSpec(data.image_size, scale, color) for color in global_color] + [
        ViewSpec(data.local_crop_size, data.local_crop_scale, local_color) for _ in range(data.local_crops)
    ]
