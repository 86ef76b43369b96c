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
) -> list[dict]:
    """Biases, norm weights (unless `decay_1d`: MoCo v1/v2's released code decays them) and the names in
    `skip` (tokens, embeddings) get no weight decay. `lr_scale(name)` multiplies a parameter's learning rate
    (layer-wise decay in fine-tuning): parameters are grouped by (decayed, scale), decayed groups first.

    Every group says whether it is `decayed` (what weight-decay schedules and resumes set) and its `lr_scale`
    (what the learning-rate schedule multiplies); without `lr_scale` there are exactly two groups."""
    groups: dict[tuple[bool, float], list[nn.Parameter]] = {(True, 1.0): [], (False, 1.0): []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
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


def build_optimizer(
    model: nn.Module,
    cfg: OptimConfig,
    lr: float,
    skip: set[str],
    lr_scale: Callable[[str], float] | None = None,
) -> torch.optim.Optimizer:
    """optim.name over `param_groups`: decayed groups are (for LARS) trust-ratio adapted, the others (biases,
    normalization weights, `skip`) neither decayed nor adapted."""
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
    optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int, peak_lr: float, start_step: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate as a function of the step and the settings alone, standing at `start_step`.

    A resumed run builds it anew from the settings it resumes with (so a changed rate, warmup or length
    takes effect at the resumed step); with unchanged settings it equals the saved schedule exactly."""
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = peak_lr * group.get("lr_scale", 1.0)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: learning_rate(cfg, step, total_steps, peak_lr) / peak_lr,
        last_epoch=start_step - 1,
    )


def set_hyperparameters(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """Settings that a loaded optimizer state carries in its parameter groups are taken from the config,
    so a resume with changed settings uses them (the moments are kept)."""
    for index, group in enumerate(optimizer.param_groups):
        if "betas" in group:
            group["betas"] = tuple(cfg.betas)
        if "eps" in group:
            group["eps"] = cfg.eps
        if "momentum" in group:  # SGD and LARS
            group["momentum"], group["nesterov"] = cfg.momentum, cfg.nesterov
        if "eta" in group:
            group["eta"] = cfg.lars_eta
        group["weight_decay"] = cfg.weight_decay if is_decayed(group, index) else 0.0


def cosine_ramp(step: int, total: int, start: float, end: float) -> float:
    """Half a cosine from `start` at step 0 to `end` at `total` (DINO's weight decay and EMA momentum)."""
    progress = min(1.0, step / max(1, total))
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WeightDecaySchedule:
    """Sets the decay of every decayed parameter group for the coming step (DINO raises it 0.04 -> 0.4).

    A pure function of the step, so nothing needs checkpointing; a no-op when weight_decay_end < 0.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int) -> None:
        self.optimizer, self.cfg, self.total = optimizer, cfg, total_steps
        self.enabled = cfg.weight_decay_end >= 0

    def apply(self, step: int) -> float:
        """Weight decay used by optimizer step `step` (0-based)."""
        if not self.enabled:
            return self.cfg.weight_decay
        value = cosine_ramp(step, self.total, self.cfg.weight_decay, self.cfg.weight_decay_end)
        for index, group in enumerate(self.optimizer.param_groups):
            if is_decayed(group, index):
                group["weight_decay"] = value
        return value
