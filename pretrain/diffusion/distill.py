"""Targets of diffusion distillation for the rectified flow of `flow.py`, as pure functions of velocity functions.

Conventions as in `flow.py` and `sampling.py`: x_t = (1 - t) x + t z, t = 0 data, t = 1 noise; a velocity
function maps (x [B, ...], t [B]) to dx/dt; the guidance scale s is the paper's (s = 1: no guidance). Every
target is computed without grad: it is a constant the student regresses.

- Progressive distillation (Salimans & Ho, 2022), in Euler form: one student step of the (shifted) uniform
  grid of `steps` steps regresses two teacher steps of the grid of 2 x `steps`. The paper distils DDIM steps
  with an x- or v-prediction target; here both student and teacher are Euler samplers of velocities, so the
  target is the velocity whose single Euler step lands where the teacher's two land.
- Consistency distillation (Song et al., 2023, "Consistency Models"): the discrete-time CD of that paper
  with its Euler ODE solver, not the continuous-time sCM (Lu & Song, 2024). Discrete CD needs only forwards
  of the teacher and of the target network, where sCM needs Jacobian-vector products through the network
  (and a TrigFlow parameterization) that the engines here do not support. The consistency function is
  f(x, t) = x - t v(x, t): the one Euler step to t = 0, so the boundary condition f(x, 0) = x holds by
  construction instead of through the paper's c_skip/c_out skip schedule.
- Guidance distillation (Meng et al., 2023, stage one): a student with a guidance-scale input (DiT with
  `guidance_embed`) regresses the teacher's classifier-free guided velocity at scales drawn per sample.
  The paper's w is s - 1 here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from pretrain.diffusion.sampling import VelocityFn, combine_guidance, time_grid


def _per_sample(t: Tensor, like: Tensor) -> Tensor:
    """[B] -> [B, 1, ...] for broadcasting over `like`'s non-batch dimensions (dtype kept)."""
    return t.reshape(-1, *([1] * (like.dim() - 1)))


def _euler_step(velocity: VelocityFn, x: Tensor, t: Tensor, t_next: Tensor) -> Tensor:
    """x + (t_next - t) v(x, t), with the step size computed in the times' dtype as `sample_euler` does, so
    that a step here equals a step there bit for bit."""
    return x + _per_sample(t_next - t, x) * velocity(x, t)


def _adjacent_times(
    grid: Tensor, stride: int, batch: int, generator: torch.Generator | None
) -> tuple[Tensor, Tensor, Tensor]:
    """A random step index k per sample of a grid of (len(grid) - 1) / stride steps: grid[stride k],
    grid[stride k + 1] and grid[stride (k + 1)]."""
    steps = (grid.numel() - 1) // stride
    k = torch.randint(0, steps, (batch,), generator=generator, device=grid.device)
    return grid[stride * k], grid[stride * k + 1], grid[stride * (k + 1)]


# ---- progressive distillation ----


class StepTimes(NamedTuple):
    """One student step per sample, t -> t_next (t > t_next), and the teacher's grid point t_mid between."""

    t: Tensor
    t_mid: Tensor
    t_next: Tensor


def student_times(
    steps: int,
    batch: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> StepTimes:
    """A uniformly drawn step of the student's sampler grid `time_grid(steps, shift)` per sample, with the
    teacher's grid point between its ends.

    All three come from the teacher's grid `time_grid(2 * steps, shift)` (points 2k, 2k + 1, 2k + 2), whose
    even points are the student's grid. With shift != 1, t_mid is the shifted midpoint of the unshifted
    times, not (t + t_next) / 2: training then visits exactly the times the two samplers use.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return StepTimes(*_adjacent_times(time_grid(2 * steps, shift, device), 2, batch, generator))


@torch.no_grad()
def progressive_target(
    teacher: VelocityFn, x_t: Tensor, t: Tensor, t_next: Tensor, t_mid: Tensor | None = None
) -> Tensor:
    """The velocity v* with x_t + (t_next - t) v* = the teacher's two Euler steps t -> t_mid -> t_next
    (Salimans & Ho, 2022, Algorithm 2, with Euler in place of DDIM steps).

    A student trained on it with `student_times` reproduces the teacher's `sample_euler(2 * steps)` with
    `sample_euler(steps)`; a teacher with straight paths (velocity constant along them) gives back its own
    velocity. t_mid defaults to (t + t_next) / 2, the teacher's grid point for shift 1 only: pass the one of
    `student_times` for a shifted grid. Times [B]; x_t [B, ...].
    """
    if t_mid is None:
        t_mid = (t + t_next) / 2
    x_mid = _euler_step(teacher, x_t, t, t_mid)
    x_next = _euler_step(teacher, x_mid, t_mid, t_next)
    return (x_next - x_t) / _per_sample(t_next - t, x_t)


# ---- consistency distillation ----


def consistency_times(
    scales: int,
    batch: int,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Adjacent times (t, t_prev), t > t_prev, of the discretization `time_grid(scales, shift)`, uniform over
    its intervals per sample (the paper's n ~ U[1, N - 1]). The last interval ends at t_prev = 0, where the
    target is the teacher's Euler step itself: the boundary condition anchors the chain."""
    if scales < 1:
        raise ValueError(f"scales must be >= 1, got {scales}")
    t, t_prev, _ = _adjacent_times(time_grid(scales, shift, device), 1, batch, generator)
    return t, t_prev


def consistency_function(velocity: VelocityFn, x: Tensor, t: Tensor) -> Tensor:
    """f(x, t) = x - t v(x, t), the estimate of the data point x_0 on x's ODE path: exact for straight paths,
    and f(x, 0) = x for any network, the boundary condition of Song et al. (2023) without a skip schedule."""
    return x - _per_sample(t, x) * velocity(x, t)


@torch.no_grad()
def consistency_target(teacher: VelocityFn, target_net: VelocityFn, x_t: Tensor, t: Tensor, t_prev: Tensor) -> Tensor:
    """f_target(x_prev, t_prev), x_prev = one teacher Euler step from x_t at t to t_prev < t (Song et al.,
    2023, Algorithm 2 with the Euler solver). The student's f(x_t, t) regresses it; `target_net` is the
    EMA ("target") copy of the student, `teacher` may itself be a guided velocity."""
    x_prev = _euler_step(teacher, x_t, t, t_prev)
    return consistency_function(target_net, x_prev, t_prev)


def consistency_loss(prediction: Tensor, target: Tensor, huber_c: float | None = None) -> Tensor:
    """The distance between f_student(x_t, t) and the target, in float32, averaged over the batch.

    `huber_c` None: the squared L2 distance averaged over elements (Song et al., 2023, with lambda = 1).
    Otherwise the pseudo-Huber distance sqrt(|d|^2 + c^2) - c of each sample's whole difference d (Song &
    Dhariwal, 2023, "Improved Techniques for Training Consistency Models", who take c = 0.00054 sqrt(dim));
    it grows linearly for large d, so outlier samples weigh less than under the squared distance.
    """
    diff = prediction.float() - target.float()
    if huber_c is None:
        return diff.pow(2).mean()
    if huber_c <= 0:
        raise ValueError(f"huber_c must be positive, got {huber_c}")
    squared = diff.pow(2).flatten(1).sum(dim=1)
    return ((squared + huber_c**2).sqrt() - huber_c).mean()


@torch.no_grad()
def consistency_sample(
    velocity: VelocityFn,
    noise: Tensor,
    times: Sequence[float] = (1.0,),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Multistep consistency sampling (Song et al., 2023, Algorithm 1, on the rectified-flow path).

    x_0 = f(noise, 1); then for each later time tau: x_tau = (1 - tau) x_0 + tau z with fresh noise z, and
    x_0 = f(x_tau, tau). One network call per time: `times` (1.0,) is single-step generation. `generator`
    (on noise's device) draws the fresh noise.
    """
    times = [float(tau) for tau in times]
    if not times or times[0] != 1.0:
        raise ValueError(f"times must start at 1.0 (pure noise), got {times}")
    if any(not 0 < b < a for a, b in zip(times[:-1], times[1:])):
        raise ValueError(f"times must decrease strictly and stay in (0, 1], got {times}")
    batch = noise.shape[0]
    x0 = consistency_function(velocity, noise, noise.new_full((batch,), 1.0))
    for tau in times[1:]:
        z = torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)
        x_tau = (1 - tau) * x0 + tau * z
        x0 = consistency_function(velocity, x_tau, noise.new_full((batch,), tau))
    return x0


# ---- guidance distillation ----


def sample_guidance_scales(
    batch: int,
    low: float,
    high: float,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Guidance scales s ~ U[low, high] per sample (Meng et al. draw w = s - 1 uniformly), so that one
    student covers the whole range of scales a sampler may ask for."""
    if high < low:
        raise ValueError(f"need low <= high, got [{low}, {high}]")
    return low + (high - low) * torch.rand(batch, generator=generator, device=device)


@torch.no_grad()
def guidance_target(
    teacher_model: nn.Module,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor,
    scale: Tensor | float,
    null_class: int,
    guided_channels: int = 0,
) -> Tensor:
    """The teacher's classifier-free guided velocity v_u + s (v_c - v_u) with a scale s per sample ([B]),
    from one forward of the doubled batch [labels; null] as in `guided_velocity` (Meng et al., 2023, stage one).

    The teacher must be in eval mode: in training mode a DiT replaces labels by the null class at random.
    """
    if teacher_model.training:
        raise ValueError("the guidance teacher must be in eval mode (its label dropout would corrupt the target)")
    null = torch.full_like(labels, null_class)
    v = teacher_model(torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([labels, null]))
    v_cond, v_uncond = v.chunk(2)
    scale = torch.as_tensor(scale, device=x_t.device).expand(x_t.shape[0])
    return combine_guidance(v_cond, v_uncond, _per_sample(scale, v_cond), guided_channels)


def distilled_guidance_velocity(model: nn.Module, labels: Tensor, scale: float) -> VelocityFn:
    """The velocity function of a guidance-distilled DiT (built with `guidance_embed`) at scale s: one
    forward of the plain batch per step, where `guided_velocity` needs the doubled one."""

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        return model(x, t, labels, guidance=torch.full((x.shape[0],), float(scale), device=x.device))

    return velocity
