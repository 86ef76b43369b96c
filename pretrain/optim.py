"""The optimizers (AdamW, SGD with momentum, LARS) over the usual parameter groups, and the warmup + cosine
learning-rate schedule."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pretrain.config import OptimConfig


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Peak learning rate: MAE/MoCo/DINO scale a base rate linearly with the batch (reference 256), DINOv2 with
    its square root (reference 1024: sqrt_wrt_1024)."""
    if cfg.lr_scaling == "linear":
        return cfg.base_lr * global_batch / 256
    if cfg.lr_scaling == "sqrt":
        return cfg.base_lr * math.sqrt(global_batch / 1024)
    return cfg.base_lr


def param_groups(
    model: nn.Module,
    weight_decay: float,
    skip: set[str],
    decay_1d: bool = False,
    lr_scale: Callable[[str], float] | None = None,
    only: Callable[[str], bool] | None = None,
) -> list[dict]:
    """Biases, norm weights (unless `decay_1d`: MoCo v1/v2's released code decays them) and the names in
    `skip` (tokens, embeddings) get no weight decay. `lr_scale(name)` multiplies a parameter's learning rate
    (layer-wise decay in fine-tuning): parameters are grouped by (decayed, scale), decayed groups first.

    Every group says whether it is `decayed` (what weight-decay schedules and resumes set) and its `lr_scale`
    (what the learning-rate schedule multiplies); without `lr_scale` there are exactly two groups. `only(name)`
    selects the parameters (one player's)."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in model.named_parameters():
        if not param.requires_grad or (only is not None and not only(name)):
            continue
        decayed = not ((param.ndim <= 1 and not decay_1d) or name in skip)
        scale = float(lr_scale(name)) if lr_scale is not None else 1.0
        groups.setdefault((decayed, scale), []).append(param)
    ordered = sorted(groups.items(), key=lambda item: (not item[0][0], -item[0][1]))
    return [
        {"params": params, "weight_decay": weight_decay if decayed else 0.0, "decayed": decayed, "lr_scale": scale}
        for (decayed, scale), params in ordered
        if params or scale == 1.0
    ]


# A player's name -> (its optimizer settings, its peak learning rate): see `Method.players`.
PlayerOptims = dict[str, tuple[OptimConfig, float]]


def player_of(name: str, players: dict[str, tuple[str, ...]]) -> str:
    """The player whose modules hold parameter `name`; a trainable parameter of no player is an error."""
    for player, modules in players.items():
        if any(name == module or name.startswith(module + ".") for module in modules):
            return player
    raise ValueError(f"parameter {name!r} belongs to no player ({', '.join(players)}); every trained network needs one")


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    skip: set[str],
    lr_scale: Callable[[str], float] | None = None,
    players: dict[str, tuple[tuple[str, ...], OptimConfig, float]] | None = None,
) -> torch.optim.Optimizer:
    """optim.name over `param_groups`: decayed groups are (for LARS) trust-ratio adapted, the others (biases,
    normalization weights, `skip`) neither decayed nor adapted.

    With `players` (name -> (modules, settings, peak lr)) every group holds one player's parameters, marked
    `player`, with that player's rate, betas and weight decay. One optimizer object keeps every player's state,
    so checkpoints, resumes and resharding are those of one optimizer; a player steps alone because the loop
    drops the other players' gradients first, and the optimizers skip parameters without one."""
    if players:
        owners = {name: player_of(name, {p: m for p, (m, _, _) in players.items()}) for name, param in
                  model.named_parameters() if param.requires_grad}  # fmt: skip
        groups = []
        for player, (_, settings, peak) in players.items():
            mine = param_groups(model, settings.weight_decay, skip, settings.decay_biases_and_norms, lr_scale,
                                only=lambda name, player=player: owners.get(name) == player)  # fmt: skip
            for group in mine:
                group["player"], group["lr"] = player, peak * group["lr_scale"]
                if cfg.name == "adamw":
                    group["betas"] = tuple(settings.betas)
            groups += mine
    else:
        groups = param_groups(model, cfg.weight_decay, skip, cfg.decay_biases_and_norms, lr_scale)
        for group in groups:
            group["lr"] = lr * group["lr_scale"]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, foreach=True)
    if cfg.name == "lars":
        for group in groups:
            group["lars_adapt"] = group["decayed"]
        return LARS(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, eta=cfg.lars_eta)
    # The fused kernel only exists for accelerator tensors; foreach is the fast path on CPU.
    on_cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, fused=True if on_cuda else None)


def group_settings(
    group: dict, cfg: OptimConfig, peak_lr: float, players: PlayerOptims | None
) -> tuple[OptimConfig, float]:
    """The settings and peak rate that govern a parameter group: its player's, else [optim]'s."""
    if players and group.get("player") in players:
        return players[group["player"]]
    return cfg, peak_lr


def is_decayed(group: dict, index: int) -> bool:
    """Whether a parameter group takes weight decay; groups saved before groups said so: the first one."""
    return group.get("decayed", index == 0)


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio (You, Gitman, Ginsburg 2017), as SimCLR and BYOL use it.

    For each parameter w of a group with `lars_adapt` (weights of convolutions and linears; biases and
    normalization weights are left out of the adaptation and of weight decay, as in those recipes):

        d = g + wd * w
        d = d * eta * |w| / |d|        (only where both norms are > 0; else d is unchanged)
        v = momentum * v + d
        w = w - lr * v                 (Nesterov: w = w - lr * (d + momentum * v))

    Parameters of groups without `lars_adapt` take the same momentum step on d = g + wd * w (their wd is 0
    in `build_optimizer`). The learning rate multiplies the momentum buffer from outside, as in torch's SGD,
    so the state is one `momentum_buffer` per parameter and resumes and reshards like SGD's. Norms are of
    the whole parameter: under FSDP2 the parameters are DTensors and their norms are reduced over shards.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        nesterov: bool = False,
        eta: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or not 0 <= momentum < 1 or eta <= 0:
            raise ValueError(f"LARS: need lr >= 0, 0 <= momentum < 1, eta > 0; got {lr}, {momentum}, {eta}")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "eta": eta, "weight_decay": weight_decay,
                    "lars_adapt": True}  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001, ANN201
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                update = (
                    param.grad.add(param, alpha=group["weight_decay"]) if group["weight_decay"] else param.grad.clone()
                )
                if group["lars_adapt"]:
                    weight_norm, update_norm = param.norm(), update.norm()
                    trust = group["eta"] * weight_norm / update_norm
                    ok = (weight_norm > 0) & (update_norm > 0)
                    update.mul_(torch.where(ok, trust, torch.ones_like(trust)))
                state = self.state[param]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = update.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(update)
                buffer = state["momentum_buffer"]
                step = update.add(buffer, alpha=group["momentum"]) if group["nesterov"] else buffer
                param.add_(step, alpha=-group["lr"])
        return loss


def warmup_cosine(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warmup to `peak`, then half a cosine down to `floor` at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_step_decay(
    step: int, total: int, warmup: int, peak: float, milestones: tuple[float, ...], gamma: float
) -> float:
    """Linear warmup to `peak`, then `peak` times `gamma` for each milestone (a fraction of `total`) reached."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * gamma ** sum(step >= milestone * total for milestone in milestones)


def learning_rate(cfg: OptimConfig, step: int, total_steps: int, peak_lr: float) -> float:
    """The rate of optimizer step `step` (0-based) under `cfg.schedule`."""
    if cfg.schedule == "step":
        return warmup_step_decay(step, total_steps, cfg.warmup_steps, peak_lr, cfg.lr_milestones, cfg.lr_gamma)
    floor = cfg.min_lr * peak_lr / cfg.base_lr if cfg.lr_scaling == "linear" else cfg.min_lr
    return warmup_cosine(step, total_steps, cfg.warmup_steps, peak_lr, floor)


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: OptimConfig,
    total_steps: int,
    peak_lr: float,
    start_step: int = 0,
    players: PlayerOptims | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate as a function of the step and the settings alone, standing at `start_step`.

    A resumed run builds it anew from the settings it resumes with (so a changed rate, warmup or length
    takes effect at the resumed step); with unchanged settings it equals the saved schedule exactly. Each
    player's groups follow the player's own settings, on the loop's step clock."""
    lambdas = []
    for group in optimizer.param_groups:
        settings, peak = group_settings(group, cfg, peak_lr, players)
        group["lr"] = group["initial_lr"] = peak * group.get("lr_scale", 1.0)
        lambdas.append(lambda step, c=settings, p=peak: learning_rate(c, step, total_steps, p) / p)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas, last_epoch=start_step - 1)


def set_hyperparameters(
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, players: PlayerOptims | None = None
) -> None:
    """Settings that a loaded optimizer state carries in its parameter groups are taken from the config (a
    player's groups from the player's), so a resume with changed settings uses them (the moments are kept)."""
    for index, group in enumerate(optimizer.param_groups):
        settings, _ = group_settings(group, cfg, 0.0, players)
        if "betas" in group:
            group["betas"] = tuple(settings.betas)
        if "eps" in group:
            group["eps"] = settings.eps
        if "momentum" in group:  # SGD and LARS
            group["momentum"], group["nesterov"] = settings.momentum, settings.nesterov
        if "eta" in group:
            group["eta"] = settings.lars_eta
        group["weight_decay"] = settings.weight_decay if is_decayed(group, index) else 0.0


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """Half a cosine from `start` at step 0 to `end` at `total` (DINO's weight decay and EMA momentum)."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightDecaySchedule:
    """Sets the decay of every decayed parameter group for the coming step (DINO raises it 0.04 -> 0.4).

    A pure function of the step, so nothing needs checkpointing; a no-op when weight_decay_end < 0 (for a
    player's groups: the player's weight decay, with [optim]'s end).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, players: PlayerOptims | None = None
    ) -> None:
        self.optimizer, self.cfg, self.total, self.players = optimizer, cfg, total_steps, players
        self.enabled = cfg.weight_decay_end >= 0

    def apply(self, step: int) -> float:
        """Weight decay used by optimizer step `step` (0-based), of [optim]'s groups."""
        if not self.enabled:
            return self.cfg.weight_decay
        value = self.cfg.weight_decay
        for index, group in enumerate(self.optimizer.param_groups):
            if is_decayed(group, index):
                settings, _ = group_settings(group, self.cfg, 0.0, self.players)
                group["weight_decay"] = cosine_ramp(step, self.total, settings.weight_decay, self.cfg.weight_decay_end)
        return cosine_ramp(step, self.total, value, self.cfg.weight_decay_end)
