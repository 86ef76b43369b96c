"""Distillation of a rectified-flow DiT for sampling in few steps: progressive, consistency and guidance.

A frozen teacher (a `dit` run's EMA network, or an earlier distillation's) supervises a student of the same
network (method.dit), which starts as a copy of it. The targets are the pure functions of
`pretrain/diffusion/distill.py`, which cites the formulations:

- progressive (Salimans & Ho, 2022): one Euler step of the student's `student_steps`-step grid regresses two of
  the teacher's; the student of one round is the teacher of the next, halving the steps each time.
- consistency (Song et al., 2023, discrete-time CD with the Euler solver): f(x_t, t) = x_t - t v(x_t, t) of the
  student regresses f of the target network one teacher step closer to the data; sampling takes 1 to N calls.
- guidance (Meng et al., 2023, stage one): a student with a guidance-scale input (method.dit.guidance_embed)
  regresses the teacher's classifier-free guided velocity at scales drawn per sample, in one forward of the
  plain batch. Its checkpoint is a teacher for progressive or consistency distillation (their stage two), whose
  students then keep the scale input: one student samples with and without guidance.

Labels are dropped to the null class by the method (method.dit.class_dropout), once for teacher and student,
so a student also learns the teacher's unconditional velocity; the networks themselves drop none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from pretrain.config import Config, ConfigError, bounded
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
from pretrain.diffusion.flow import interpolate, logit_normal_timesteps
from pretrain.diffusion.sampling import VelocityFn, time_grid
from pretrain.flops import FlopCount
from pretrain.methods import dit
from pretrain.methods.spec import MethodSpec
from pretrain.models.class_dropout import drop_labels
from pretrain.models.dit import DIT_SIZES, DiT
from pretrain.visualize import image_grid

Mode = Literal["progressive", "consistency", "guidance"]


@dataclass
class DiTDistillConfig:
    """method.dit_distill: the distillation; method.dit describes the network (teacher's and student's), the
    data space, the EMA and the pictures."""

    # progressive | consistency | guidance (see pretrain/methods/dit_distill.py).
    mode: Mode = "progressive"
    # The frozen teacher: a dit run or checkpoint; a guidance distillation's (for progressive or consistency);
    # progressive: also the previous round's, whose student_steps are twice this run's.
    teacher_checkpoint: str = ""
    # progressive: the student's Euler steps (its sampling default); the teacher's sampler takes twice as many.
    student_steps: int = bounded(8, ge=1)
    # consistency: N, the intervals of the discretized teacher ODE (the CD paper: 18 on CIFAR-10, 40 on ImageNet
    # 64); method.dit.t_shift shifts its grid.
    scales: int = bounded(18, ge=1)
    # consistency: the target network. ema: method.dit's EMA, its momentum the paper's mu (0.95 for CD on
    # ImageNet 64), which then also samples | student: the stop-gradient student (mu = 0, Song & Dhariwal 2023).
    target: Literal["ema", "student"] = "ema"
    # consistency: 0: the squared L2 distance (the CD paper's l2) | > 0: pseudo-Huber with this c (iCT:
    # 0.00054 sqrt(dimension)).
    huber_c: float = bounded(0.0, ge=0)
    # A student with a guidance input draws s ~ U[low, high] per sample (1: no guidance).
    guidance_scales: tuple[float, float] = bounded((1.0, 4.0), ge=0)


class DistilledDiT(dit.RectifiedFlowDiT):
    """The student (`model`), its EMA (`ema`, which samples) and the frozen teacher (`teacher`).

    The teacher is a submodule so that it is sharded and checkpointed like the student (a resumed run needs no
    teacher files); its parameters do not require grad and it stays in eval mode.
    """

    def __init__(
        self,
        model: DiT,
        teacher: DiT,
        *,
        mode: str,
        label_dropout: float,
        student_steps: int = 8,
        scales: int = 18,
        target: str = "ema",
        huber_c: float = 0.0,
        guidance_scales: tuple[float, float] = (1.0, 4.0),
        **settings,
    ) -> None:
        super().__init__(model, **settings)
        self.teacher = teacher.requires_grad_(False).eval()
        self.mode, self.label_dropout = mode, label_dropout
        self.student_steps, self.scales, self.target, self.huber_c = student_steps, scales, target, huber_c
        self.guidance_scales = guidance_scales

    def train(self, mode: bool = True) -> DistilledDiT:
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def init_weights(self) -> None:
        """A random teacher, replaced by its checkpoint's weights (`teacher_state`) in a new run."""
        super().init_weights()
        self.teacher.init_weights()

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [*super().transformer_blocks(), self.teacher.blocks]

    def teacher_sources(self) -> tuple[str, ...]:
        """The teacher run's sampling network (a dit's or a distillation's EMA) and its latent scale."""
        return ("ema.", "latent_scale")

    def teacher_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The teacher, and the student and its EMA starting as copies of it. A guidance student's scale embedder,
        which its teacher lacks, keeps its init: its zero output layer makes the student the teacher's
        conditional model at every scale."""
        saved_scale = state.pop("latent_scale")
        ours = torch.tensor(self.initial_latent_scale, dtype=saved_scale.dtype)  # the buffer may be on meta
        if not torch.equal(saved_scale, ours):
            raise ConfigError(
                f"method.dit.latent_scale: the teacher trained on latents scaled by {float(saved_scale):g}, this run "
                f"scales them by {self.initial_latent_scale:g}; set it to the teacher's"
            )
        weights = {name.removeprefix("ema."): tensor for name, tensor in state.items()}
        return {f"{net}.{name}": tensor for net in ("teacher", "model", "ema") for name, tensor in weights.items()}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        labels = drop_labels(batch["label"], self.label_dropout, self.model.null_class)
        noise = torch.randn_like(x)
        batch_size = x.shape[0]
        scale = None
        if self.model.guidance_embed:
            scale = sample_guidance_scales(batch_size, *self.guidance_scales, device=x.device)

        def velocity(net: DiT) -> VelocityFn:
            """`net`'s velocity for these labels, at these scales when the networks take them (None: no input);
            a guidance distillation's teacher, without the input, goes through `guidance_target` instead."""
            return lambda x_in, t_in: net(x_in, t_in, labels, guidance=scale)

        if self.mode == "progressive":
            t, t_mid, t_next = student_times(self.student_steps, batch_size, self.t_shift, device=x.device)
            x_t = interpolate(x, noise, t)
            target = progressive_target(velocity(self.teacher), x_t, t, t_next, t_mid)
            prediction = self.model(x_t, t, labels, guidance=scale)
        elif self.mode == "consistency":
            t, t_prev = consistency_times(self.scales, batch_size, self.t_shift, device=x.device)
            x_t = interpolate(x, noise, t)
            target_net = self.ema if self.target == "ema" else self.model
            target = consistency_target(velocity(self.teacher), velocity(target_net), x_t, t, t_prev)
            prediction = consistency_function(velocity(self.model), x_t, t)
            return {"loss": consistency_loss(prediction, target, self.huber_c or None)}
        else:
            t = logit_normal_timesteps(batch_size, self.t_mean, self.t_std, self.t_shift, x.device)
            x_t = interpolate(x, noise, t)
            target = guidance_target(self.teacher, x_t, t, labels, scale, self.teacher.null_class)
            prediction = self.model(x_t, t, labels, guidance=scale)
        return {"loss": (prediction.float() - target.float()).pow(2).mean()}

    def velocity(self, net: DiT, labels: Tensor, scale: float, guided_channels: int) -> VelocityFn:
        """A student with a guidance input takes s in its one forward; one without is guided as a DiT is."""
        if not net.guidance_embed:
            return super().velocity(net, labels, scale, guided_channels)
        if guided_channels:
            raise ValueError("a guidance-distilled DiT guides every channel: guided_channels does not apply")
        return distilled_guidance_velocity(net, labels, scale)

    def integrate(
        self,
        velocity: VelocityFn,
        noise: Tensor,
        steps: int,
        sampler: str,
        generator: torch.Generator | None,
        net: DiT,
    ) -> Tensor:
        """A consistency student: multistep consistency sampling at the first `steps` times of the shifted grid
        (one network call each; fresh noise from `generator` between them); the others, and the teacher: the ODE
        sampler."""
        if self.mode != "consistency" or net is self.teacher:
            return super().integrate(velocity, noise, steps, sampler, generator, net)
        if sampler != "euler":
            raise ValueError(f"a consistency student samples by its own multistep rule, not by {sampler!r}")
        times = time_grid(steps, self.t_shift)[:-1].tolist()
        return consistency_sample(velocity, noise, times, generator)

    def sampler_name(self, sampler: str) -> str:
        return "consistency multistep" if self.mode == "consistency" else sampler

    def teacher_steps(self) -> int:
        """The teacher's steps the student stands for: twice a progressive student's, the consistency grid's
        intervals, or as many as a guidance student's."""
        return {"progressive": 2 * self.student_steps, "consistency": self.scales}.get(self.mode, self.sample_steps)

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The student's samples (as a DiT's), and one row of the teacher's in `teacher_steps` above one of the
        student's, one column per class, from the same noise."""
        pictures = super().visuals(batch)
        labels = torch.arange(min(self.ema.num_classes, 10))
        device = self.ema.x_embedder.weight.device
        rows = [
            self.generate(labels, steps, generator=torch.Generator(device=device).manual_seed(0), network=net)
            for net, steps in ((self.teacher, self.teacher_steps()), (self.ema, None))
        ]
        pictures["teacher_vs_student"] = image_grid(self.decode(torch.cat(rows)), nrow=len(labels))
        return pictures


def build(cfg: Config) -> DistilledDiT:
    d = cfg.method.dit_distill
    student = dit.build_network(cfg, class_dropout=0.0)
    teacher = dit.build_network(cfg, class_dropout=0.0, guidance_embed=teacher_has_guidance_input(cfg))
    settings = dit.method_settings(cfg)
    if d.mode == "progressive":
        settings["sample_steps"] = d.student_steps
    return DistilledDiT(
        student,
        teacher,
        mode=d.mode,
        label_dropout=cfg.method.dit.class_dropout,
        student_steps=d.student_steps,
        scales=d.scales,
        target=d.target,
        huber_c=d.huber_c,
        guidance_scales=tuple(d.guidance_scales),
        **settings,
    )


def teacher_has_guidance_input(cfg: Config) -> bool:
    """A guidance distillation's teacher has none; the others' teacher has the student's network."""
    return cfg.method.dit.guidance_embed and cfg.method.dit_distill.mode != "guidance"


def validate(cfg: Config) -> None:
    dit.validate_network(cfg)
    d, net = cfg.method.dit_distill, cfg.method.dit
    if not d.teacher_checkpoint:
        raise ConfigError("method.dit_distill.teacher_checkpoint: a distillation needs its teacher's run or checkpoint")
    if d.mode == "guidance" and not net.guidance_embed:
        raise ConfigError("method.dit.guidance_embed: a guidance distillation's student takes the scale as an input")
    low, high = d.guidance_scales
    if low > high:
        raise ConfigError(f"method.dit_distill.guidance_scales: need low <= high, got [{low}, {high}]")
    if net.guidance_embed and net.sample_guided_channels:
        raise ConfigError("method.dit.sample_guided_channels: a guidance-distilled DiT guides every channel; set 0")
    if d.mode == "consistency" and net.sampler != "euler":
        raise ConfigError(
            f"method.dit.sampler: a consistency student samples by its own multistep rule; {net.sampler!r} does not "
            "apply (set 'euler')"
        )


# The settings of method.dit that make the teacher's function: its network and the time grid.
_NETWORK_KEYS = ("patch_size", "input_size", "in_channels", "num_classes", "space", "t_shift", "guidance_embed")


def _resolved(dit_cfg) -> dict[str, object]:
    """The network's settings with the size's width, depth and heads resolved (size "S" = hidden_dim 384)."""
    dim, depth, heads = DIT_SIZES[dit_cfg.size]
    values = {key: getattr(dit_cfg, key) for key in _NETWORK_KEYS}
    return values | {
        "hidden_dim": dit_cfg.hidden_dim or dim,
        "depth": dit_cfg.depth or depth,
        "num_heads": dit_cfg.num_heads or heads,
    }


def check_teacher(cfg: Config, teacher: Config) -> None:
    """Before any work: the teacher's run is one this mode distills, with this run's network (the student's,
    less the guidance input a guidance distillation adds) and time grid."""
    d = cfg.method.dit_distill
    source = f"the teacher {d.teacher_checkpoint}"
    kind = teacher.method.name
    if kind == "dit_distill":
        kind = f"{teacher.method.dit_distill.mode} distillation"
    allowed = {
        "guidance": ("dit",),
        "consistency": ("dit", "guidance distillation"),
        "progressive": ("dit", "guidance distillation", "progressive distillation"),
    }[d.mode]
    if kind not in allowed:
        raise ConfigError(
            f"method.dit_distill.teacher_checkpoint: {source} is a {kind} run; a {d.mode} distillation's teacher is "
            f"a run of: {', '.join(allowed)}"
        )
    if kind == "progressive distillation" and teacher.method.dit_distill.student_steps != 2 * d.student_steps:
        raise ConfigError(
            f"method.dit_distill.student_steps: {source} samples in {teacher.method.dit_distill.student_steps} steps; "
            f"the next round halves them: set {teacher.method.dit_distill.student_steps // 2}"
        )
    theirs, ours = _resolved(teacher.method.dit), _resolved(cfg.method.dit)
    ours["guidance_embed"] = teacher_has_guidance_input(cfg)
    wrong = [(key, theirs[key], ours[key]) for key in ours if theirs[key] != ours[key]]
    if wrong:
        key, saved, now = wrong[0]
        if key == "guidance_embed":
            fix = f"method.dit.guidance_embed={str(saved).lower()}"
        else:
            fix = " ".join(f"method.dit.{k}={v!r}" for k, v, _ in wrong if k != "guidance_embed")
        raise ConfigError(
            f"method.dit.{key}: {source} was trained with {saved!r}, this run's "
            f"{'teacher' if key == 'guidance_embed' else 'student'} has {now!r}; to take that teacher set {fix}"
        )


def flops(cfg: Config) -> FlopCount:
    """The student's forward (trained) and the networks run without grad: two teacher steps (progressive); a
    teacher step and the target network (consistency); the teacher on the doubled batch (guidance)."""
    student = dit.forward_flops(cfg)
    teacher = dit.forward_flops(cfg, guidance_embed=teacher_has_guidance_input(cfg))
    mode = cfg.method.dit_distill.mode
    frozen = {"progressive": 2 * teacher, "consistency": teacher + student, "guidance": 2 * teacher}[mode]
    return FlopCount(student, frozen)


def averaged_network_runs_forward(cfg: Config) -> bool:
    """Consistency distillation's EMA target network runs forward every step; an EMA kept for sampling does not."""
    d = cfg.method.dit_distill
    return d.mode == "consistency" and d.target == "ema"


SPEC = MethodSpec(
    "dit_distill",
    DiTDistillConfig,
    build,
    dit.train_transform,
    validate=validate,
    flops=flops,
    activations=dit.activations,
    averaged_network_runs_forward=averaged_network_runs_forward,
    synthetic_overrides=dit.synthetic_overrides,
    teacher_checkpoint=lambda cfg: cfg.method.dit_distill.teacher_checkpoint,
    check_teacher=check_teacher,
)
