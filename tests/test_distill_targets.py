"""Distillation targets (progressive, consistency, guidance) against hand-computed and analytic answers, and
the DiT's guidance-scale input."""

from __future__ import annotations

import pytest
import torch

from pretrain.diffusion.distill import (
    consistency_function,
    consistency_loss,
    consistency_sample,
    consistency_target,
    consistency_times,
    distilled_guidance_velocity,
    guidance_target,
    progressive_target,
    sample_guidance_scales,
    student_times,
)
from pretrain.diffusion.sampling import sample_euler, time_grid
from pretrain.models.dit import DiT, build_dit

pytestmark = pytest.mark.usefixtures("one_thread")


def curved(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A nonlinear velocity field (curved paths), so that one Euler step never equals two by accident."""
    t = t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    return torch.sin(3 * x) * (1 + t) - 0.7 * t**2 * x + 0.3


def straight_to(x0: torch.Tensor):
    """v(x, t) = (x - x0) / t: every path is the straight line from x0, so any Euler step is exact."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (x - x0) / t.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    return velocity


def tiny_dit(**kwargs) -> DiT:
    torch.manual_seed(0)
    options = dict(input_size=8, patch_size=2, in_channels=3, hidden_dim=32, depth=1, num_heads=2, num_classes=5)
    model = DiT(**{**options, **kwargs}).double().eval()
    with torch.no_grad():
        for p in model.parameters():  # leave adaLN-Zero's zero output
            p.add_(0.05 * torch.randn_like(p))
    return model


# ---- progressive distillation ----


def test_progressive_target_is_two_hand_computed_euler_steps_of_a_linear_field():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 4, generator=gen, dtype=torch.float64), torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    t, t_next = torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64), torch.tensor([0.5, 0.25, 0.0], dtype=torch.float64)

    def linear(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x @ a.T + t[:, None] * b

    for i in range(3):
        ti, tn = t[i].item(), t_next[i].item()
        tm = (ti + tn) / 2
        x_mid = x[i] + (tm - ti) * (a @ x[i] + ti * b)
        x_next = x_mid + (tn - tm) * (a @ x_mid + tm * b)
        expected = (x_next - x[i]) / (tn - ti)
        assert torch.allclose(progressive_target(linear, x, t, t_next)[i], expected, rtol=0, atol=1e-12)


def test_straight_path_teachers_give_back_their_own_velocity():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t, t_mid, t_next = student_times(3, 4, shift=3.0, generator=gen)
    constant = torch.randn(1, 2, 3, 3, generator=gen, dtype=torch.float64)
    target = progressive_target(lambda x, t: constant.expand_as(x), x, t, t_next, t_mid)
    assert torch.allclose(target, constant.expand_as(x), rtol=0, atol=1e-12)
    through = straight_to(torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64))
    assert torch.allclose(progressive_target(through, x, t, t_next, t_mid), through(x, t), rtol=0, atol=1e-10)


def test_student_times_lie_on_the_student_grid_with_the_teacher_grid_between():
    gen = torch.Generator().manual_seed(2)
    steps, shift = 4, 3.0
    t, t_mid, t_next = student_times(steps, 256, shift=shift, generator=gen)
    student, teacher = time_grid(steps, shift), time_grid(2 * steps, shift)
    k = (t[:, None] == student[None]).float().argmax(dim=1)
    assert torch.equal(t, student[k]) and torch.equal(t_next, student[k + 1]) and torch.equal(t_mid, teacher[2 * k + 1])
    assert set(k.tolist()) == set(range(steps))  # every student step is trained
    assert not torch.allclose(t_mid, (t + t_next) / 2)  # shifted: the teacher's point, not the plain midpoint


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 4])
def test_a_student_of_the_targets_samples_like_the_teacher_with_twice_the_steps(steps, shift):
    student_grid, teacher_grid = time_grid(steps, shift), time_grid(2 * steps, shift)

    def student(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Outputs the target at the grid point it is called at: a perfectly trained student."""
        k = int((student_grid == t[0]).nonzero())
        expand = lambda s: s.expand(x.shape[0])  # noqa: E731
        times = expand(student_grid[k]), expand(student_grid[k + 1]), expand(teacher_grid[2 * k + 1])
        return progressive_target(curved, x, *times)

    noise = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    teacher_sample = sample_euler(curved, noise, 2 * steps, shift)
    assert torch.allclose(sample_euler(student, noise, steps, shift), teacher_sample, rtol=0, atol=1e-12)
    assert not torch.allclose(sample_euler(curved, noise, steps, shift), teacher_sample, atol=1e-3)


# ---- consistency distillation ----


def test_the_consistency_function_is_the_identity_at_t_zero():
    x = torch.randn(3, 2, 4, 4)
    assert torch.equal(consistency_function(lambda x, t: 1e6 * torch.randn_like(x), x, torch.zeros(3)), x)


def test_straight_paths_are_collapsed_to_their_data_point_from_any_time():
    gen = torch.Generator().manual_seed(4)
    x0 = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    velocity = straight_to(x0)
    t = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.01], dtype=torch.float64)
    x_t = (1 - t[:, None, None, None]) * x0 + t[:, None, None, None] * torch.randn_like(x0)
    assert torch.allclose(consistency_function(velocity, x_t, t), x0, rtol=0, atol=1e-12)
    t_prev = t / 2
    assert torch.allclose(consistency_target(velocity, velocity, x_t, t, t_prev), x0, rtol=0, atol=1e-12)
    one = straight_to(x0[:1])
    assert torch.allclose(consistency_sample(one, torch.randn_like(x0[:1]), [1.0, 0.5, 0.2], gen), x0[:1], atol=1e-12)


def test_the_consistency_target_is_f_of_the_target_net_after_one_teacher_step():
    gen = torch.Generator().manual_seed(5)
    x_t = torch.randn(4, 2, 3, 3, generator=gen, dtype=torch.float64)
    t, t_prev = consistency_times(8, 4, shift=2.0, generator=gen)

    def target_net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.cos(x) * t.reshape(-1, 1, 1, 1)

    b = lambda s: s.reshape(-1, 1, 1, 1)  # noqa: E731
    x_prev = x_t + b(t_prev - t) * curved(x_t, t)
    expected = x_prev - b(t_prev) * target_net(x_prev, t_prev)
    assert torch.allclose(consistency_target(curved, target_net, x_t, t, t_prev), expected, rtol=0, atol=1e-12)
    assert not consistency_target(curved, target_net, x_t.requires_grad_(), t, t_prev).requires_grad


def test_consistency_times_are_adjacent_points_of_the_grid():
    grid = time_grid(6, 2.0)
    t, t_prev = consistency_times(6, 200, shift=2.0, generator=torch.Generator().manual_seed(6))
    k = (t[:, None] == grid[None]).float().argmax(dim=1)
    assert torch.equal(t, grid[k]) and torch.equal(t_prev, grid[k + 1]) and (t > t_prev).all()
    assert set(k.tolist()) == set(range(6)) and (t_prev == 0).any()


def test_consistency_sampling_makes_one_network_call_per_time():
    calls = []

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(t.clone())
        return curved(x, t)

    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = consistency_sample(velocity, noise, [1.0])
    assert len(calls) == 1 and torch.equal(calls[0], torch.ones(2, dtype=torch.float64))
    assert torch.equal(out, noise - 1 * curved(noise, torch.ones(2)))
    calls.clear()
    first = consistency_sample(velocity, noise, [1.0, 0.6, 0.3], torch.Generator().manual_seed(7))
    assert [c[0].item() for c in calls] == [1.0, 0.6, 0.3]
    again = consistency_sample(velocity, noise, [1.0, 0.6, 0.3], torch.Generator().manual_seed(7))
    assert torch.equal(first, again) and not torch.allclose(first, out)
    for bad in ([0.5], [1.0, 0.5, 0.5], [1.0, 0.0]):
        with pytest.raises(ValueError):
            consistency_sample(velocity, noise, bad)


def test_consistency_losses():
    pred, target = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    assert torch.allclose(consistency_loss(pred, target), ((pred - target) ** 2).mean())
    c = 0.03
    per_sample = ((pred - target).flatten(1).norm(dim=1) ** 2 + c**2).sqrt() - c
    assert torch.allclose(consistency_loss(pred, target, huber_c=c), per_sample.mean())
    assert consistency_loss(target, target, huber_c=c) == 0


# ---- guidance distillation and the DiT's guidance input ----


def test_guidance_target_combines_the_teachers_two_predictions_per_sample():
    teacher = tiny_dit()
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, 8, 8, generator=gen, dtype=torch.float64)
    t, labels = torch.rand(4, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    scales = sample_guidance_scales(4, 1.0, 5.0, gen).double()
    assert ((scales >= 1) & (scales <= 5)).all() and scales.unique().numel() == 4
    v_cond, v_null = teacher(x, t, labels), teacher(x, t, torch.full_like(labels, teacher.null_class))
    expected = torch.stack([v_null[i] + scales[i] * (v_cond[i] - v_null[i]) for i in range(4)])
    target = guidance_target(teacher, x, t, labels, scales, teacher.null_class)
    assert torch.allclose(target, expected, rtol=0, atol=1e-10)
    ones = guidance_target(teacher, x, t, labels, torch.ones(4), teacher.null_class)
    assert torch.allclose(ones, v_cond, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="eval mode"):
        guidance_target(teacher.train(), x, t, labels, scales, teacher.null_class)


def test_the_guidance_input_is_required_when_on_and_refused_when_off():
    x, t, labels = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64),
        torch.tensor([0, 1]),
    )
    with pytest.raises(ValueError, match="guidance_embed"):
        tiny_dit()(x, t, labels, guidance=torch.ones(2))
    with pytest.raises(ValueError, match="pass guidance"):
        tiny_dit(guidance_embed=True)(x, t, labels)


def test_the_guidance_input_conditions_the_output():
    student = tiny_dit(guidance_embed=True)
    x, t, labels = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64),
        torch.tensor([0, 1]),
    )
    low, high = (
        student(x, t, labels, guidance=torch.full((2,), 1.5)),
        student(x, t, labels, guidance=torch.full((2,), 4.0)),
    )
    assert not torch.allclose(low, high)
    assert torch.equal(student(x, t, labels, guidance=4.0), high)  # one number for the batch
    assert torch.equal(distilled_guidance_velocity(student, labels, 4.0)(x, t), high)


def test_without_guidance_the_state_dict_is_unchanged_and_a_fresh_guidance_embedder_adds_nothing():
    options = dict(hidden_dim=32, depth=1, num_heads=2, input_size=8, patch_size=2, in_channels=3, num_classes=5)
    plain, guided = build_dit("S", **options), build_dit("S", guidance_embed=True, **options)
    assert not any("g_embedder" in key for key in plain.state_dict())
    extra = set(guided.state_dict()) - set(plain.state_dict())
    assert extra and all(key.startswith("g_embedder.") for key in extra)
    assert set(plain.state_dict()) <= set(guided.state_dict())
    # a student initialized from a teacher checkpoint starts as the teacher, whatever the scale
    teacher = tiny_dit()
    student = build_dit("S", guidance_embed=True, **options).double().eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert not unexpected and missing and all(key.startswith("g_embedder.") for key in missing)
    x, t, labels = (
        torch.randn(2, 3, 8, 8, dtype=torch.float64),
        torch.rand(2, dtype=torch.float64),
        torch.tensor([0, 1]),
    )
    assert torch.equal(student(x, t, labels, guidance=torch.tensor([1.0, 7.0])), teacher(x, t, labels))


def test_init_weights_covers_the_guidance_embedder_after_a_meta_build():
    with torch.device("meta"):
        model = DiT(input_size=8, patch_size=2, in_channels=3, hidden_dim=32, depth=1, num_heads=2, guidance_embed=True)
    model.to_empty(device="cpu")
    model.init_weights()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    first, last = model.g_embedder.mlp[0], model.g_embedder.mlp[2]
    assert 0.01 < first.weight.std() < 0.03 and (first.bias == 0).all()
    assert (last.weight == 0).all() and (last.bias == 0).all()
