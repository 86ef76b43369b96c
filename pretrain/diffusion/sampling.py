"""ODE samplers for rectified flow, and classifier-free guidance in one batched forward.

A velocity function maps (x [B, ...], t [B]) to dx/dt. Samplers integrate from pure noise at t = 1
to data at t = 0 on a uniform (optionally shifted) time grid.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from pretrain.diffusion.flow import shift_timesteps

VelocityFn = Callable[[Tensor, Tensor], Tensor]
# The one list of samplers; method.dit.sampler and `pretrain sample --sampler` are typed by it.
Sampler = Literal["euler", "heun"]
SAMPLERS: tuple[str, ...] = get_args(Sampler)


def combine_guidance(v_cond: Tensor, v_uncond: Tensor, scale: float, channels: int = 0) -> Tensor:
    """Classifier-free guidance as in the DiT paper, its released sampler and diffusers:
    v = v_uncond + s (v_cond - v_uncond); s = 1 is the conditional model alone (no guidance).

    `channels` > 0 guides only the first `channels` channels (dim 1) and keeps the conditional
    prediction for the rest: the released DiT sampler guides 3 of the 4 latent channels, so this
    reproduces its numbers; 0 (all channels) is the standard formula.
    """
    guided = v_uncond + scale * (v_cond - v_uncond)
    if channels <= 0 or channels >= v_cond.shape[1]:
        return guided
    return torch.cat([guided[:, :channels], v_cond[:, channels:]], dim=1)


def guided_velocity(
    model: nn.Module, labels: Tensor, scale: float, null_class: int, guided_channels: int = 0
) -> VelocityFn:
    """A velocity function of a class-conditional model with guidance scale s (paper convention).

    For s != 1 the conditional and unconditional predictions come from one forward of the doubled
    batch [labels; null], so guidance costs one (larger) call per step rather than two.
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        if scale == 1:
            return model(x, t, labels)
        null = torch.full_like(labels, null_class)
        v = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        v_cond, v_uncond = v.chunk(2)
        return combine_guidance(v_cond, v_uncond, scale, guided_channels)

    return velocity


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> Tensor:
    """steps + 1 times from 1 down to 0."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


@torch.no_grad()
def sample_euler(velocity: VelocityFn, noise: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """x_{t_next} = x_t + (t_next - t) v(x_t, t): one model call per step."""
    x = noise
    times = time_grid(steps, shift, noise.device)
    for t, t_next in zip(times[:-1], times[1:]):
        x = x + (t_next - t) * velocity(x, t.expand(x.shape[0]))
    return x


@torch.no_grad()
def sample_heun(velocity: VelocityFn, noise: Tensor, steps: int, shift: float = 1.0) -> Tensor:
    """Heun's second-order method: an Euler step, then the average of the velocities at both ends.

    Two model calls per step; the rectified-flow velocity is defined at t = 0, so the last step is
    corrected too.
    """
    x = noise
    times = time_grid(steps, shift, noise.device)
    for t, t_next in zip(times[:-1], times[1:]):
        dt = t_next - t
        v = velocity(x, t.expand(x.shape[0]))
        x_euler = x + dt * v
        x = x + dt * 0.5 * (v + velocity(x_euler, t_next.expand(x.shape[0])))
    return x


def sample(velocity: VelocityFn, noise: Tensor, steps: int, sampler: str = "euler", shift: float = 1.0) -> Tensor:
    if sampler == "euler":
        return sample_euler(velocity, noise, steps, shift)
    if sampler == "heun":
        return sample_heun(velocity, noise, steps, shift)
    raise ValueError(f"unknown sampler {sampler!r}; available: {', '.join(SAMPLERS)}")
