"""Random Erasing (Zhong et al. 2017) as timm applies it after normalization (the MAE fine-tuning recipe:
prob 0.25, mode 'pixel', count 1), drawing every random number from an explicit `torch.Generator`.

With probability `prob`, erase `count` boxes (a per-image count uniform in [1, count] when count > 1). Each box
takes up to 10 tries of (area fraction uniform in `scale`, divided by the count; aspect h / w log-uniform in
`ratio`), rounded to whole pixels, and is kept only if strictly smaller than the image on both sides; if no try
fits, that box is skipped. The box is filled with standard normal noise (the normalized data's own scale): per
pixel ('pixel'), one value per channel ('rand'), or zeros, i.e. the mean ('const').

Deviations from timm, and why:
- Random numbers come from `gen` (torch) instead of Python's `random` and torch's global RNG: reproducible per
  sample. The distributions are the same; the streams differ.
- Erasing happens when u < prob (timm: unless u > prob), so prob = 0 never erases. Same probability otherwise.
- Returns a new tensor and leaves the input alone (timm erases in place); takes one image [C, H, W] (timm also
  takes a batch). Noise is drawn on the CPU from `gen` and moved to the image's device and dtype.
"""

from __future__ import annotations

import math

import torch

from data_pipeline.augment import _randint, _uniform

MODES = ("pixel", "rand", "const")


class RandomErasing:
    """Erase random boxes of a normalized float image [C, H, W] with noise (timm semantics)."""

    def __init__(
        self,
        prob: float = 0.25,
        scale: tuple[float, float] = (0.02, 1 / 3),
        ratio: tuple[float, float] = (0.3, 1 / 0.3),
        mode: str = "pixel",
        count: int = 1,
    ) -> None:
        if not 0 <= prob <= 1:
            raise ValueError(f"RandomErasing prob must be in [0, 1], got {prob}")
        if not (0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"RandomErasing scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomErasing ratio must satisfy 0 < min <= max, got {ratio}")
        if mode not in MODES:
            raise ValueError(f"RandomErasing mode must be one of {MODES}, got {mode!r}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"RandomErasing count must be an integer >= 1, got {count!r}")
        self.prob, self.scale, self.ratio, self.mode, self.count = prob, tuple(scale), tuple(ratio), mode, count
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def _box(self, height: int, width: int, count: int, gen: torch.Generator) -> tuple[int, int, int, int] | None:
        """(top, left, h, w) of one erase, or None when 10 tries found none that fits."""
        for _ in range(10):
            target_area = _uniform(self.scale[0], self.scale[1], gen) * height * width / count
            aspect = math.exp(_uniform(self.log_ratio[0], self.log_ratio[1], gen))
            h = round(math.sqrt(target_area * aspect))
            w = round(math.sqrt(target_area / aspect))
            if h < height and w < width:  # strictly inside, as timm
                return _randint(0, height - h + 1, gen), _randint(0, width - w + 1, gen), h, w
        return None

    def _noise(self, channels: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
        if self.mode == "pixel":
            return torch.randn((channels, h, w), generator=gen)
        if self.mode == "rand":
            return torch.randn((channels, 1, 1), generator=gen)
        return torch.zeros((channels, 1, 1))

    def __call__(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if x.dim() != 3 or not x.is_floating_point():
            raise ValueError(f"RandomErasing takes a float tensor [C, H, W], got {x.dtype} {tuple(x.shape)}")
        if _uniform(0.0, 1.0, gen) >= self.prob:
            return x.clone()
        channels, height, width = x.shape
        count = _randint(1, self.count + 1, gen) if self.count > 1 else 1
        out = x.clone()
        for _ in range(count):
            box = self._box(height, width, count, gen)
            if box is None:
                continue
            top, left, h, w = box
            noise = self._noise(channels, h, w, gen).to(device=x.device, dtype=x.dtype)
            out[:, top : top + h, left : left + w] = noise
        return out

    def __repr__(self) -> str:
        return f"RandomErasing(p={self.prob}, scale={self.scale}, ratio={self.ratio}, mode={self.mode}, count={self.count})"
