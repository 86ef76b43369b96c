"""sRGB <-> CIE L*a*b* in torch, on float batches [..., 3, H, W] (channels at dim -3).

The standard formulas: the sRGB transfer curve (IEC 61966-2-1: linear below 0.04045, exponent 2.4 above),
the sRGB primaries to XYZ matrix for the D65 white (as tabulated by Bruce Lindbloom), and CIE 1976 L*a*b*
relative to the D65 white point (X, Y, Z) = (0.95047, 1, 1.08883), with the linear segment below
(6/29)^3. L is in [0, 100]; a and b span about [-86, 98] and [-108, 95] over the sRGB gamut.
"""

from __future__ import annotations

import torch
from torch import Tensor

RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
D65_WHITE = (0.95047, 1.0, 1.08883)
_DELTA = 6.0 / 29.0


def _mix(matrix: Tensor, x: Tensor) -> Tensor:
    """Apply a 3x3 matrix over the channel dim -3."""
    return torch.einsum("ij,...jhw->...ihw", matrix, x)


def _constants(x: Tensor) -> tuple[Tensor, Tensor]:
    matrix = torch.tensor(RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    white = torch.tensor(D65_WHITE, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return matrix, white


def srgb_to_linear(x: Tensor) -> Tensor:
    return torch.where(x <= 0.04045, x / 12.92, ((x.clamp(min=0.04045) + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(x: Tensor) -> Tensor:
    return torch.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clamp(min=0.0031308) ** (1 / 2.4) - 0.055)


def _f(t: Tensor) -> Tensor:
    return torch.where(t > _DELTA**3, t.clamp(min=_DELTA**3) ** (1 / 3), t / (3 * _DELTA**2) + 4 / 29)


def _f_inverse(t: Tensor) -> Tensor:
    return torch.where(t > _DELTA, t**3, 3 * _DELTA**2 * (t - 4 / 29))


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1] -> (L, a, b), same shape."""
    matrix, white = _constants(rgb)
    xyz = _mix(matrix, srgb_to_linear(rgb)) / white
    fx, fy, fz = _f(xyz).unbind(dim=-3)
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], dim=-3)


def lab_to_rgb(lab: Tensor, clamp: bool = True) -> Tensor:
    """(L, a, b) -> sRGB, clamped to [0, 1] unless `clamp` is False (colors outside the gamut then show)."""
    matrix, white = _constants(lab)
    light, a, b = lab.unbind(dim=-3)
    fy = (light + 16) / 116
    xyz = _f_inverse(torch.stack([fy + a / 500, fy, fy - b / 200], dim=-3)) * white
    rgb = linear_to_srgb(_mix(torch.linalg.inv(matrix), xyz))
    return rgb.clamp(0, 1) if clamp else rgb
