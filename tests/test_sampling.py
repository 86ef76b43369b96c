"""Rectified flow: path, target and loss; the logit-normal timestep sampler; guidance; Euler and Heun
samplers recover a known Gaussian data distribution from its exact velocity field."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from pretrain.diffusion.flow import (
    flow_matching_loss,
    interpolate,
    logit_normal_timesteps,
    shift_timesteps,
    velocity_target,
)
from pretrain.diffusion.sampling import combine_guidance, guided_velocity, sample, time_grid


def test_path_ends_and_constant_velocity():
    x, z = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.randn(3, 2, 4, 4, dtype=torch.float64)
    assert torch.equal(interpolate(x, z, torch.zeros(3, dtype=torch.float64)), x)
    assert torch.equal(interpolate(x, z, torch.ones(3, dtype=torch.float64)), z)
    t, h = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64), 1e-3
    derivative = (interpolate(x, z, t + h) - interpolate(x, z, t)) / h
    assert torch.allclose(derivative, velocity_target(x, z), atol=1e-9)
    assert torch.equal(velocity_target(x, z), z - x)


def test_loss_is_the_velocity_mse():
    x, z = torch.randn(4, 3), torch.randn(4, 3)
    assert flow_matching_loss(z - x, x, z) == 0
    prediction = torch.randn(4, 3)
    assert flow_matching_loss(prediction, x, z) == pytest.approx(((prediction - (z - x)) ** 2).mean().item())


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.5, 0.7)])
def test_logit_normal_timesteps_have_normal_logits(mean, std):
    t = logit_normal_timesteps(20000, mean, std, generator=torch.Generator().manual_seed(0)).double()
    assert 0 < t.min() and t.max() < 1
    logits = torch.log(t / (1 - t)).numpy()
    assert stats.kstest(logits, "norm", args=(mean, std)).pvalue > 0.01


def test_shift_moves_timesteps_toward_noise():
    t = logit_normal_timesteps(20000, shift=3.0, generator=torch.Generator().manual_seed(0))
    assert t.median().item() == pytest.approx(3 * 0.5 / (1 + 2 * 0.5), abs=0.01)  # monotone map of the median 0.5
    grid = torch.linspace(0, 1, 11)
    assert torch.equal(shift_timesteps(grid, 1.0), grid)
    assert (shift_timesteps(grid, 3.0) >= grid).all()
    assert shift_timesteps(torch.tensor([0.0, 1.0]), 3.0).tolist() == [0.0, 1.0]


def test_guidance_combination_follows_the_paper():
    """v = v_uncond + s (v_cond - v_uncond): s = 1 is the conditional model, s = 0 the unconditional."""
    v_cond, v_uncond = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, 3.0]])
    assert torch.equal(combine_guidance(v_cond, v_uncond, 1.0), v_cond)
    assert torch.equal(combine_guidance(v_cond, v_uncond, 0.0), v_uncond)
    assert torch.allclose(combine_guidance(v_cond, v_uncond, 4.0), v_uncond + 4 * (v_cond - v_uncond))


def test_guidance_of_the_first_channels_only_keeps_the_conditional_rest():
    """The released DiT sampler guides 3 of the 4 latent channels; the 4th is the conditional prediction."""
    v_cond, v_uncond = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    v = combine_guidance(v_cond, v_uncond, 5.0, channels=3)
    assert torch.allclose(v[:, :3], v_uncond[:, :3] + 5 * (v_cond[:, :3] - v_uncond[:, :3]))
    assert torch.equal(v[:, 3:], v_cond[:, 3:])
    assert torch.equal(combine_guidance(v_cond, v_uncond, 5.0, channels=0), combine_guidance(v_cond, v_uncond, 5.0))


class RecordingModel(torch.nn.Module):
    """v = label (broadcast), recording each call's batch."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[torch.Tensor] = []

    def forward(self, x, t, labels):
        self.calls.append(labels.clone())
        return labels.float().view(-1, 1).expand_as(x)


def test_guidance_is_one_batched_forward_with_null_labels():
    model = RecordingModel()
    labels = torch.tensor([1, 2, 3])
    v = guided_velocity(model, labels, 2.0, null_class=7)(torch.zeros(3, 4), torch.full((3,), 0.5))
    assert len(model.calls) == 1 and model.calls[0].tolist() == [1, 2, 3, 7, 7, 7]
    assert torch.allclose(v[:, 0], 7 + 2 * (labels.float() - 7))
    model.calls.clear()
    guided_velocity(model, labels, 1.0, null_class=7)(torch.zeros(3, 4), torch.full((3,), 0.5))
    assert [c.tolist() for c in model.calls] == [[1, 2, 3]]  # s = 1: no unconditional half


def gaussian_velocity(mu: float, sigma: float):
    """E[z - x | x_t] when x ~ N(mu, sigma^2) and z ~ N(0, 1) independently, per coordinate."""

    def velocity(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, b = (1 - t).view(-1, 1), t.view(-1, 1)
        var = a**2 * sigma**2 + b**2
        centered = x_t - a * mu
        return b / var * centered - (mu + a * sigma**2 / var * centered)

    return velocity


@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 25)])
def test_samplers_recover_a_gaussian_from_its_true_velocity(sampler, steps):
    mu, sigma = 1.5, 0.4
    noise = torch.randn(40000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample(gaussian_velocity(mu, sigma), noise, steps, sampler)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(sigma, abs=0.01)
    assert stats.kstest(x[:, 0].numpy(), "norm", args=(mu, sigma)).pvalue > 0.001


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    mu, sigma = 1.5, 0.4
    noise = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    exact = sample(gaussian_velocity(mu, sigma), noise, 2000, "heun")
    euler = (sample(gaussian_velocity(mu, sigma), noise, 10, "euler") - exact).abs().max()
    heun = (sample(gaussian_velocity(mu, sigma), noise, 10, "heun") - exact).abs().max()
    assert heun < euler / 5


def test_time_grid_runs_from_noise_to_data():
    grid = time_grid(4)
    assert grid.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert math.isclose(time_grid(4, shift=3.0)[2].item(), 0.75)
    with pytest.raises(ValueError):
        time_grid(0)
