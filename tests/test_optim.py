"""Schedule shape, lr scaling and weight-decay groups."""

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.optim import build_scheduler, param_groups, scaled_lr, warmup_cosine


def test_warmup_then_cosine():
    peak, floor = 1.0, 0.1
    assert warmup_cosine(0, 100, 10, peak, floor) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, peak, floor) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, peak, floor) == pytest.approx(1.0)
    mid = 10 + 45
    assert warmup_cosine(mid, 100, 10, peak, floor) == pytest.approx(floor + (peak - floor) * 0.5)
    assert warmup_cosine(100, 100, 10, peak, floor) == pytest.approx(floor)
    values = [warmup_cosine(s, 100, 10, peak, floor) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_lr_scaling():
    cfg = OptimConfig(base_lr=1.5e-4)
    assert scaled_lr(cfg, 4096) == pytest.approx(1.5e-4 * 16)
    assert scaled_lr(OptimConfig(base_lr=3e-4, lr_scaling="none"), 4096) == 3e-4


def test_scheduler_follows_function_and_resumes():
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(base_lr=0.5, lr_scaling="none", min_lr=0.05, warmup_steps=3)
    opt = torch.optim.AdamW(model.parameters())
    sched = build_scheduler(opt, cfg, total_steps=20, peak_lr=0.5)
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([warmup_cosine(s, 20, 3, 0.5, 0.05) for s in range(8)])
    opt2 = torch.optim.AdamW(model.parameters())
    sched2 = build_scheduler(opt2, cfg, total_steps=20, peak_lr=0.5)
    sched2.load_state_dict(sched.state_dict())
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert math.isclose(sched2.get_last_lr()[0], warmup_cosine(8, 20, 3, 0.5, 0.05))


def test_no_decay_for_biases_norms_and_named_tokens():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = param_groups(model, 0.05, skip={"token"})
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
