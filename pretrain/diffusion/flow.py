"""Rectified flow (Liu et al., 2022; SD3's recipe, Esser et al., 2024): a straight path from data to noise.

    x_t = (1 - t) x + t z,   z ~ N(0, I),   t in [0, 1] (t = 0: data, t = 1: noise)

The network regresses the path's constant velocity v = dx_t/dt = z - x; sampling integrates
dx/dt = v(x, t) from t = 1 back to t = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def shift_timesteps(t: Tensor, shift: float) -> Tensor:
    """Move t toward 1 (more noise) for shift > 1: t' = s t / (1 + (s - 1) t).

    Larger inputs keep more signal at a given noise level, so they need more of training (and of
    the sampler's steps) at high noise; SD3 uses s = sqrt(resolution ratio).
    """
    if shift == 1.0:
        return t
    return shift * t / (1 + (shift - 1) * t)


def logit_normal_timesteps(
    n: int,
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """t = sigmoid(u), u ~ N(mean, std^2), then `shift_timesteps`: concentrates training on the middle
    of the path, where the velocity is hardest to predict (SD3, section 3.1)."""
    u = torch.randn(n, device=device, generator=generator) * std + mean
    return shift_timesteps(torch.sigmoid(u), shift)


def interpolate(x: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x + t z, with t [B] broadcast over the other dimensions."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return (1 - t) * x + t * noise


def velocity_target(x: Tensor, noise: Tensor) -> Tensor:
    """The velocity of the straight path from x (t = 0) to noise (t = 1)."""
    return noise - x


def flow_matching_loss(prediction: Tensor, x: Tensor, noise: Tensor) -> Tensor:
    """Mean squared error of the predicted velocity, in float32."""
    return (prediction.float() - velocity_target(x, noise).float()).pow(2).mean()
