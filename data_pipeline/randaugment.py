"""RandAugment as in timm's 'rand-m9-mstd0.5-inc1' (the MAE fine-tuning recipe), in PIL, drawing every random
number from an explicit `torch.Generator` so an augmented image is a pure function of (image, generator seed).

Per image: `num_layers` ops are chosen uniformly, with replacement, from the 15 "increasing" ops (the stronger
the magnitude, the stronger every op). Each is applied with probability `prob`, at a magnitude drawn from
N(magnitude, magnitude_std) and clipped to [0, magnitude_max], mapped to the op's argument with timm's
level -> argument formulas (level / 10 of the full range; geometric and enhance ops get a random sign).
Geometric ops fill with the ImageNet mean color (124, 116, 104) and resample bicubic, as timm's
`create_transform(..., interpolation='bicubic')` passes them.

Deviations from timm, and why:
- Random numbers come from `gen` (torch) instead of Python's `random` and numpy's global RNG: reproducible
  per sample and independent of worker or global state. The distributions are the same; the streams differ.
- The apply-or-skip number is drawn for every chosen op, even at prob = 1 (timm skips the draw), and an op is
  applied when u < prob (timm: unless u > prob), so prob = 0 never applies one. Same probabilities otherwise.
- Posterize is a lookup table of its own: the PIL here rejects 0 bits, which timm's PosterizeIncreasing asks
  for at magnitude 10 (clipped noise reaches it); 0 bits gives black, as it did with older PIL.
- Mode "L" images get the fill's luma as a single value; timm passes the 3-tuple, which PIL rejects for "L".
  Modes other than "RGB" and "L" raise ValueError (timm's SolarizeAdd silently skips them).
"""

from __future__ import annotations

import math

import torch
from PIL import Image, ImageEnhance, ImageOps

from data_pipeline.augment import _randint, _uniform

LEVEL_DENOM = 10.0  # magnitude M maps to the fraction M / 10 of each op's full range, as in timm

IMAGENET_FILL = (124, 116, 104)  # round(255 * IMAGENET_MEAN), timm's fill for geometric ops

RAND_INCREASING_OPS: tuple[str, ...] = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)

_GEOMETRIC_RESAMPLING = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)

OpArgument = float | int | None


def _random_sign(value: float, gen: torch.Generator) -> float:
    """Negate with probability 1/2: geometric and enhance ops go either way from 'no change'."""
    return -value if _uniform(0.0, 1.0, gen) > 0.5 else value


def rotate_degrees(magnitude: float, gen: torch.Generator) -> float:
    """Rotation in degrees, +-30 at magnitude 10."""
    return _random_sign(magnitude / LEVEL_DENOM * 30.0, gen)


def shear_factor(magnitude: float, gen: torch.Generator) -> float:
    """Shear factor, +-0.3 at magnitude 10."""
    return _random_sign(magnitude / LEVEL_DENOM * 0.3, gen)


def translate_fraction(magnitude: float, gen: torch.Generator, translate_pct: float = 0.45) -> float:
    """Translation as a fraction of the image side, +-translate_pct at magnitude 10."""
    return _random_sign(magnitude / LEVEL_DENOM * translate_pct, gen)


def enhance_factor(magnitude: float, gen: torch.Generator) -> float:
    """Enhance blend factor 1 +- 0.9 * M / 10, kept >= 0.1: farther from 1 (no change) as M grows."""
    return max(0.1, 1.0 + _random_sign(magnitude / LEVEL_DENOM * 0.9, gen))


def posterize_bits(magnitude: float) -> int:
    """Bits kept: 4 at magnitude 0 down to 0 at magnitude 10 (fewer bits = stronger)."""
    return 4 - int(magnitude / LEVEL_DENOM * 4)


def solarize_threshold(magnitude: float) -> int:
    """Pixels >= threshold are inverted: 256 (none) at magnitude 0 down to 0 (all) at magnitude 10."""
    return 256 - int(magnitude / LEVEL_DENOM * 256)


def solarize_add_amount(magnitude: float) -> int:
    """Amount added to pixels below 128: 0 at magnitude 0 up to 110 at magnitude 10."""
    return int(magnitude / LEVEL_DENOM * 110)


def op_argument(name: str, magnitude: float, gen: torch.Generator, translate_pct: float = 0.45) -> OpArgument:
    """The argument of op `name` at `magnitude` (None for the ops that take none); draws a sign where timm does."""
    if name in ("AutoContrast", "Equalize", "Invert"):
        return None
    if name == "Rotate":
        return rotate_degrees(magnitude, gen)
    if name == "PosterizeIncreasing":
        return posterize_bits(magnitude)
    if name == "SolarizeIncreasing":
        return solarize_threshold(magnitude)
    if name == "SolarizeAdd":
        return solarize_add_amount(magnitude)
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return enhance_factor(magnitude, gen)
    if name in ("ShearX", "ShearY"):
        return shear_factor(magnitude, gen)
    if name in ("TranslateXRel", "TranslateYRel"):
        return translate_fraction(magnitude, gen, translate_pct)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RAND_INCREASING_OPS}")


def _fill_for(img: Image.Image, fill: tuple[int, int, int]) -> int | tuple[int, int, int]:
    """The fill in the image's mode: the color for RGB, its luma for L (PIL takes one value there)."""
    if img.mode == "L":
        return int(Image.new("RGB", (1, 1), fill).convert("L").getpixel((0, 0)))
    return fill


def _affine(
    img: Image.Image, matrix: tuple[float, ...], fill: tuple[int, int, int], interpolation: Image.Resampling
) -> Image.Image:
    """Output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f), outside -> fill."""
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=interpolation, fillcolor=_fill_for(img, fill)
    )


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` most significant bits; 0 bits gives black (PIL >= 11's posterize rejects 0, which
    magnitude 10 reaches)."""
    if bits >= 8:
        return img
    mask = 0xFF & ~((1 << (8 - max(0, bits))) - 1)
    return img.point([i & mask for i in range(256)] * len(img.getbands()))


def _solarize_add(img: Image.Image, amount: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + amount) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


_ENHANCERS = {
    "ColorIncreasing": ImageEnhance.Color,
    "ContrastIncreasing": ImageEnhance.Contrast,
    "BrightnessIncreasing": ImageEnhance.Brightness,
    "SharpnessIncreasing": ImageEnhance.Sharpness,
}


def apply_op(
    img: Image.Image,
    name: str,
    arg: OpArgument = None,
    fill: tuple[int, int, int] = IMAGENET_FILL,
    interpolation: Image.Resampling = Image.Resampling.BICUBIC,
) -> Image.Image:
    """Op `name` with its argument (from `op_argument`); deterministic. A positive translate moves content
    left / up by arg * side pixels, as timm's."""
    if img.mode not in ("RGB", "L"):
        raise ValueError(f"RandAugment takes RGB or L images, got mode {img.mode!r}")
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(float(arg), resample=interpolation, fillcolor=_fill_for(img, fill))
    if name == "PosterizeIncreasing":
        return _posterize(img, int(arg))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, int(arg))
    if name == "SolarizeAdd":
        return _solarize_add(img, int(arg))
    if name in _ENHANCERS:
        return _ENHANCERS[name](img).enhance(float(arg))
    if name == "ShearX":
        return _affine(img, (1, float(arg), 0, 0, 1, 0), fill, interpolation)
    if name == "ShearY":
        return _affine(img, (1, 0, 0, float(arg), 1, 0), fill, interpolation)
    if name == "TranslateXRel":
        return _affine(img, (1, 0, float(arg) * img.width, 0, 1, 0), fill, interpolation)
    if name == "TranslateYRel":
        return _affine(img, (1, 0, 0, 0, 1, float(arg) * img.height), fill, interpolation)
    raise ValueError(f"unknown RandAugment op {name!r}; expected one of {RAND_INCREASING_OPS}")


class RandAugment:
    """timm's RandAugment with the increasing ops ('rand-m{magnitude}-n{num_layers}-mstd{magnitude_std}-inc1').

    magnitude_std = inf draws the magnitude uniformly in [0, magnitude], as timm's mstd > 100.
    """

    def __init__(
        self,
        num_layers: int = 2,
        magnitude: float = 9.0,
        magnitude_std: float = 0.5,
        magnitude_max: float = 10.0,
        prob: float = 0.5,
        fill: tuple[int, int, int] = IMAGENET_FILL,
        interpolation: Image.Resampling = Image.Resampling.BICUBIC,
        translate_pct: float = 0.45,
    ) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 0:
            raise ValueError(f"RandAugment num_layers must be an integer >= 0, got {num_layers!r}")
        if not (math.isfinite(magnitude) and magnitude >= 0):
            raise ValueError(f"RandAugment magnitude must be finite and >= 0, got {magnitude}")
        if math.isnan(magnitude_std) or magnitude_std < 0:
            raise ValueError(f"RandAugment magnitude_std must be >= 0 (inf: uniform), got {magnitude_std}")
        if not (math.isfinite(magnitude_max) and magnitude_max > 0):
            raise ValueError(f"RandAugment magnitude_max must be finite and > 0, got {magnitude_max}")
        if not 0 <= prob <= 1:
            raise ValueError(f"RandAugment prob must be in [0, 1], got {prob}")
        if len(fill) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in fill):
            raise ValueError(f"RandAugment fill must be three integers in [0, 255], got {fill!r}")
        if interpolation not in _GEOMETRIC_RESAMPLING:
            raise ValueError(f"RandAugment interpolation must be NEAREST, BILINEAR or BICUBIC, got {interpolation!r}")
        if not (math.isfinite(translate_pct) and 0 <= translate_pct <= 1):
            raise ValueError(f"RandAugment translate_pct must be in [0, 1], got {translate_pct}")
        self.num_layers, self.magnitude, self.magnitude_std = num_layers, float(magnitude), float(magnitude_std)
        self.magnitude_max, self.prob, self.fill = float(magnitude_max), prob, tuple(fill)
        self.interpolation, self.translate_pct = interpolation, translate_pct
        self.ops = RAND_INCREASING_OPS

    def choose_ops(self, gen: torch.Generator) -> list[str]:
        """`num_layers` op names, uniformly with replacement."""
        return [self.ops[_randint(0, len(self.ops), gen)] for _ in range(self.num_layers)]

    def sample_magnitude(self, gen: torch.Generator) -> float:
        """Per-op magnitude: N(magnitude, magnitude_std) (uniform in [0, magnitude] for inf), clipped to
        [0, magnitude_max], so the policy is not one fixed strength."""
        magnitude = self.magnitude
        if self.magnitude_std == math.inf:
            magnitude = _uniform(0.0, magnitude, gen)
        elif self.magnitude_std > 0:
            magnitude += self.magnitude_std * float(torch.randn((), generator=gen, dtype=torch.float64))
        return max(0.0, min(magnitude, self.magnitude_max))

    def __call__(self, img: Image.Image, gen: torch.Generator) -> Image.Image:
        if img.mode not in ("RGB", "L"):
            raise ValueError(f"RandAugment takes RGB or L images, got mode {img.mode!r}")
        for name in self.choose_ops(gen):
            if _uniform(0.0, 1.0, gen) >= self.prob:
                continue
            arg = op_argument(name, self.sample_magnitude(gen), gen, self.translate_pct)
            img = apply_op(img, name, arg, self.fill, self.interpolation)
        return img

    def __repr__(self) -> str:
        return (
            f"RandAugment(n={self.num_layers}, m={self.magnitude}, mstd={self.magnitude_std}, "
            f"mmax={self.magnitude_max}, p={self.prob})"
        )
