"""Schedule shape, lr scaling and weight-decay groups."""

import math

import pytest
import torch

from pretrain.config import OptimConfig
from pretrain.optim import LARS, build_optimizer, build_scheduler, param_groups, scaled_lr, warmup_cosine


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


def test_step_schedule_drops_by_gamma_at_each_milestone():
    """MoCo v1's schedule: the peak after the warmup, x0.1 from each milestone step on (0-based steps)."""
    model = torch.nn.Linear(2, 2)
    cfg = OptimConfig(base_lr=0.5, lr_scaling="none", warmup_steps=2, schedule="step", lr_milestones=(0.5, 0.75))
    opt = torch.optim.SGD(model.parameters())
    sched = build_scheduler(opt, cfg, total_steps=8, peak_lr=0.5, start_step=0)
    seen = []
    for _ in range(8):
        seen.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.5, 0.5, 0.05, 0.05, 0.005, 0.005])
    resumed = build_scheduler(torch.optim.SGD(model.parameters()), cfg, total_steps=8, peak_lr=0.5, start_step=5)
    assert resumed.get_last_lr()[0] == pytest.approx(0.05)


def test_no_decay_for_biases_norms_and_named_tokens():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    model.register_parameter("token", torch.nn.Parameter(torch.zeros(1, 1, 4)))
    decay, no_decay = param_groups(model, 0.05, skip={"token"})
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 4 and no_decay["weight_decay"] == 0.0
    # MoCo v1/v2's released convention decays biases and norm weights too; named skips stay out
    decay, no_decay = param_groups(model, 0.05, skip={"token"}, decay_1d=True)
    assert len(decay["params"]) == 4 and len(no_decay["params"]) == 1


# ---------------------------------------------------------------------- SGD and LARS


def _lars_reference(params, grads_per_step, lr, momentum, nesterov, eta, weight_decay, adapt):
    """LARS written out per parameter from its formula, in float64 python over lists of tensors."""
    params = [p.detach().double().clone() for p in params]
    buffers = [None] * len(params)
    for grads in grads_per_step:
        for i, (w, g) in enumerate(zip(params, grads)):
            wd = weight_decay if adapt[i] else 0.0
            d = g.double() + wd * w
            if adapt[i]:
                w_norm, d_norm = float(w.norm()), float(d.norm())
                if w_norm > 0 and d_norm > 0:
                    d = d * (eta * w_norm / d_norm)
            buffers[i] = d.clone() if buffers[i] is None else momentum * buffers[i] + d
            step = d + momentum * buffers[i] if nesterov else buffers[i]
            params[i] = w - lr * step
    return params


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_follows_its_formula_and_leaves_biases_and_norms_out(nesterov):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 3))
    with torch.no_grad():
        model[2].weight.zero_()  # a zero weight: its trust ratio falls back to 1
    cfg = OptimConfig(name="lars", weight_decay=0.1, momentum=0.9, nesterov=nesterov, lars_eta=0.02)
    opt = build_optimizer(model, cfg, lr=0.5, skip=set())
    assert isinstance(opt, LARS)
    params = [p for group in opt.param_groups for p in group["params"]]
    adapt = [group["lars_adapt"] for group in opt.param_groups for _ in group["params"]]
    # weights of the two linears are adapted and decayed; their biases and the BN's weight and bias are not
    assert [tuple(p.shape) for p, a in zip(params, adapt) if a] == [(4, 5), (3, 4)]
    start = [p.detach().clone() for p in params]
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
    expected = _lars_reference(start, grads_per_step, 0.5, 0.9, nesterov, 0.02, 0.1, adapt)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-6, atol=1e-7)
    # the zero weight of the second linear moved (its trust ratio fell back to 1)
    assert params[1].abs().sum() > 0


def test_sgd_is_torchs_sgd_with_momentum_and_nesterov():
    model = torch.nn.Linear(3, 2)
    opt = build_optimizer(model, OptimConfig(name="sgd", momentum=0.8, nesterov=True, weight_decay=0.01), 0.1, set())
    assert type(opt) is torch.optim.SGD
    assert [(g["momentum"], g["nesterov"], g["weight_decay"]) for g in opt.param_groups] == [
        (0.8, True, 0.01),
        (0.8, True, 0.0),
    ]


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        (["optim.momentum=0.5"], "optim.momentum: 0.5 is not read by optim.name='adamw'"),
        (["optim.name=sgd", "optim.eps=1e-6"], "optim.eps: 1e-06 is not read by optim.name='sgd'"),
        (["optim.name=sgd", "optim.lars_eta=0.01"], "optim.lars_eta"),
        (["optim.name=lars", "engine.kind=deepspeed"], "optim.name: engine.kind=deepspeed runs AdamW only"),
        (["optim.name=adam"], "optim.name"),
    ],
)
def test_optimizer_settings_another_optimizer_would_read_fail_naming_the_key(overrides, key):
    from pretrain.config import ConfigError
    from pretrain.engines import ENGINES
    from pretrain.recipes import load_config

    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        cfg = load_config(None, overrides)
        ENGINES[cfg.engine.kind].validate_config(cfg)


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_sgd_and_lars_runs_resume_bit_identically(tmp_path, digit_shards, optimizer):
    from pretrain.recipes import load_config
    from pretrain.train import Trainer

    from tiny import tiny_overrides

    sets = [f"optim.name={optimizer}", "optim.base_lr=0.05", "optim.weight_decay=1e-4", "tracking.enabled=false"]
    straight = Trainer(load_config(None, tiny_overrides(tmp_path / "straight", digit_shards, *sets))).fit()
    cfg = load_config(None, tiny_overrides(tmp_path / "split", digit_shards, *sets))
    first = Trainer(cfg).fit(until=3)
    resumed = Trainer(cfg)
    assert resumed.step == 3
    assert "momentum_buffer" in next(iter(resumed.optimizer.state.values()))
    second = resumed.fit()
    assert first.losses + second.losses == straight.losses
    assert len(set(straight.losses)) == 6


def test_players_get_their_own_groups_rates_betas_and_schedules():
    from pretrain.config import PlayerSettings
    from pretrain.optim import player_of

    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"g": torch.nn.Linear(3, 3), "d": torch.nn.Linear(3, 1)})
    optim = OptimConfig(base_lr=1e-3, warmup_steps=0, min_lr=1e-3, lr_scaling="none", weight_decay=0.1)
    d = PlayerSettings(base_lr=4e-3, betas=(0.0, 0.99), warmup_steps=2, weight_decay=0.0).resolve(optim)
    g = PlayerSettings().resolve(optim)
    assert (g.base_lr, g.betas, g.weight_decay) == (1e-3, optim.betas, 0.1) and d.base_lr == 4e-3
    players = {"d": (("d",), d, 4e-3), "g": (("g",), g, 1e-3)}
    optimizer = build_optimizer(model, optim, 1e-3, set(), players=players)
    by_player = {}
    for group in optimizer.param_groups:
        by_player.setdefault(group["player"], []).extend(group["params"])
    assert {id(p) for p in by_player["d"]} == {id(p) for p in model["d"].parameters()}
    assert {id(p) for p in by_player["g"]} == {id(p) for p in model["g"].parameters()}
    assert all(gr["betas"] == (0.0, 0.99) for gr in optimizer.param_groups if gr["player"] == "d")
    decayed = {gr["player"]: gr["weight_decay"] for gr in optimizer.param_groups if gr["decayed"] and gr["params"]}
    assert decayed == {"d": 0.0, "g": 0.1}
    scheduler = build_scheduler(optimizer, optim, 10, 1e-3, players={"d": (d, 4e-3), "g": (g, 1e-3)})
    rates = []
    for _ in range(3):
        rates.append({gr["player"]: gr["lr"] for gr in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    assert [r["d"] for r in rates] == pytest.approx([2e-3, 4e-3, 4e-3])  # its own 2-step warmup
    assert [r["g"] for r in rates] == pytest.approx([1e-3, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="parameter 'e.weight' belongs to no player"):
        player_of("e.weight", {"d": ("d",), "g": ("g",)})
