"""The fast CPU path for random resized crops (`data.decode = "fast"`), and its device half.

The reference is `augment.RandomResizedCrop -> RandomHorizontalFlip -> ToTensor [-> color] -> Normalize`
on a fully decoded PIL image, per view. This path produces the same distribution of crops and pixels
at a fraction of the CPU time:

- Same random draws. Every draw of a sample (each view's crop box, flip and, with color in the
  workers, color parameters) is made from the header's image size before any pixel is decoded, in
  the reference's order and from the same generator. Crop boxes and flips are therefore identical.
- Smaller decode. A JPEG is decoded in the DCT domain at the largest reduction (1/2, 1/4, 1/8) at
  which every view's crop still holds at least its output size in pixels (`Image.draft`), so no view
  is upsampled that was not before. The reduction averages blocks of pixels, as the bicubic
  downscale would have: pixels agree within a tolerance (tests), not exactly.
- Faster resize. At full resolution the crop goes through torch's antialiased bicubic resize on
  uint8 channels-last pixels: PIL's filter, about 4x faster, equal to PIL's output within 1 of 255.
  `resize="pil"` keeps PIL's resize (then full-resolution outputs are bit-identical to the reference).
- No float work in the workers. Views leave as uint8 [3, H, W] (a quarter of the bytes to move);
  `DeviceNormalize` or `views.DeviceColor` converts and normalizes whole batches on the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, RandomResizedCrop, _uniform
from data_pipeline.decode import EncodedImage
from data_pipeline.views import ColorAugment

DRAFT_FACTORS = (8, 4, 2)
RESIZE_ENGINES = ("torch", "pil")


def draft_factor(crop_width: int, crop_height: int, size: int) -> int:
    """The largest of 8, 4, 2 (else 1) by which a crop can shrink and still have `size` pixels each way."""
    return next((f for f in DRAFT_FACTORS if crop_width >= f * size and crop_height >= f * size), 1)


@dataclass(frozen=True)
class CropView:
    """One view: output side `size`, crop area fraction `scale`, and its color (None: none in workers)."""

    size: int
    scale: tuple[float, float]
    color: ColorAugment | None = None


@dataclass(frozen=True)
class ViewDraw:
    box: tuple[int, int, int, int]  # left, top, width, height in the original image
    flip: bool
    color: dict[str, Tensor] | None


class FastCrops:
    """(encoded or PIL image, generator) -> uint8 [3, size, size] per view (float, normalized, for views
    with color in the workers); a single tensor if `single`, else a list, as the reference returns."""

    accepts_encoded = True  # the reader hands it an `EncodedImage`, so the decode can be reduced

    def __init__(
        self,
        views: Sequence[CropView],
        hflip: float = 0.5,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        *,
        single: bool = False,
        draft: bool = True,
        resize: str = "torch",
    ) -> None:
        if resize not in RESIZE_ENGINES:
            raise ValueError(f"resize must be one of {RESIZE_ENGINES}, got {resize!r}")
        if single and len(views) != 1:
            raise ValueError(f"single=True needs exactly one view, got {len(views)}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip must be in [0, 1], got {hflip}")
        self.views = list(views)
        self.crops = [RandomResizedCrop(view.size, view.scale) for view in self.views]
        self.hflip, self.single, self.draft, self.resize = hflip, single, draft, resize
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def draw(self, width: int, height: int, gen: torch.Generator) -> list[ViewDraw]:
        """All random decisions for one image, in the reference pipeline's order."""
        draws = []
        for view, crop in zip(self.views, self.crops):
            box = crop.crop_box(width, height, gen)
            flip = _uniform(0.0, 1.0, gen) < self.hflip
            color = view.color.sample(1, gen) if view.color is not None else None
            draws.append(ViewDraw(box, flip, color))
        return draws

    def reduction(self, draws: Sequence[ViewDraw]) -> int:
        """The decode reduction every view can afford (1 when drafting is off)."""
        if not self.draft:
            return 1
        return min(draft_factor(d.box[2], d.box[3], view.size) for d, view in zip(draws, self.views))

    def __call__(self, image: EncodedImage | Image.Image, gen: torch.Generator) -> Tensor | list[Tensor]:
        draws = self.draw(*image.size, gen)
        if isinstance(image, EncodedImage):
            array, factor = image.decode(self.reduction(draws))
        else:
            array, factor = np.array(image if image.mode == "RGB" else image.convert("RGB")), 1
        pixels = torch.from_numpy(array)
        pil = Image.fromarray(array) if factor > 1 or self.resize == "pil" else None
        out = []
        for draw, view in zip(draws, self.views):
            if pil is None:
                x = _resize_torch(pixels, draw.box, view.size)
            else:
                x = _resize_pil(pil, draw.box, factor, view.size)
            if draw.flip:
                x = x.flip(-1)
            if draw.color is not None:
                x = view.color.apply(x.float().div_(255.0).unsqueeze(0), draw.color).squeeze(0)
                x = (x - self.mean) / self.std
            out.append(x)
        return out[0] if self.single else out


def _resize_torch(pixels: Tensor, box: tuple[int, int, int, int], size: int) -> Tensor:
    """Crop of a uint8 [H, W, 3] image, resized with antialiased bicubic -> uint8 [3, size, size]."""
    left, top, width, height = box
    region = pixels[top : top + height, left : left + width].permute(2, 0, 1).unsqueeze(0)  # channels-last view
    return F.interpolate(region, size=(size, size), mode="bicubic", antialias=True).squeeze(0).contiguous()


def _resize_pil(image: Image.Image, box: tuple[int, int, int, int], factor: int, size: int) -> Tensor:
    """PIL's bicubic resize of the crop; on an image reduced by `factor` the box is scaled to it
    (fractional: PIL's resize takes a float box)."""
    left, top, width, height = box
    if factor == 1:
        resized = image.crop((left, top, left + width, top + height)).resize((size, size), Image.Resampling.BICUBIC)
    else:
        scaled = (left / factor, top / factor, (left + width) / factor, (top + height) / factor)
        resized = image.resize((size, size), Image.Resampling.BICUBIC, box=scaled)
    return torch.from_numpy(np.array(resized)).permute(2, 0, 1).contiguous()


class DeviceNormalize:
    """The device half of the fast path for single-view methods: uint8 batches -> normalized float."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {**batch, "image": normalize_uint8(batch["image"], self.mean, self.std)}


def normalize_uint8(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> (x / 255 - mean) / std in float32, computed as ToTensor + Normalize do;
    float input is taken to be normalized already."""
    if x.dtype != torch.uint8:
        return x
    return (x.float().div_(255.0) - mean.to(x.device)) / std.to(x.device)
