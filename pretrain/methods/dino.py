"""DINO (Caron et al. 2021): a student ViT matches the centered, sharpened output distribution of its own
momentum teacher across views of different sizes (multi-crop)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.manifest import Manifest
from kernels.dino_loss import dino_loss, teacher_probabilities
from pretrain.activation_memory import STAT, Collective, blocks_bytes, layer_norm_bytes, vit_block
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.distributed import all_reduce_mean, world_size
from pretrain.flops import FlopCount, linear_flops, mlp_flops
from pretrain.methods.backbone import build_vit_backbone, validate_vit_backbone, vit_backbone_flops, vit_width
from pretrain.methods.base import Method
from pretrain.methods.joint_embedding import (
    joint_embedding_crop_views,
    joint_embedding_device_transform,
    joint_embedding_transform,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.heads import DINOHead
from pretrain.models.vit import VIT_SIZES, VisionTransformer
from pretrain.optim import cosine_ramp
from pretrain.visualize import denormalize, image_grid


@dataclass
class DINOConfig:
    """method.dino: the paper's defaults (65,536 prototypes, a 3-layer head with a 256-d bottleneck)."""

    out_dim: int = bounded(65536, gt=0)
    hidden_dim: int = bounded(2048, gt=0)
    bottleneck_dim: int = bounded(256, gt=0)
    head_layers: int = bounded(3, gt=0)
    # Weight-normalized last layer with its norm fixed to 1.
    norm_last_layer: bool = True
    student_temp: float = bounded(0.1, gt=0)
    teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp_steps: int = bounded(0, ge=0)
    # > 0: the released per-epoch schedule instead: temperature linspace(warmup_teacher_temp, teacher_temp,
    # W)[epoch], constant within an epoch and final from epoch W - 1 (the per-step ramp reaches it at W).
    warmup_teacher_temp_epochs: int = bounded(0, ge=0)
    # Steps in one epoch, for schedules given in epochs; 0: the training split's sample count in the
    # manifest of data.shards // global batch (data.batch_size x optim.accum_steps x world size).
    steps_per_epoch: int = bounded(0, ge=0)
    center_momentum: float = bounded(0.9, ge=0, lt=1)
    # Base teacher EMA momentum, raised to 1 on a cosine over training.
    momentum: float = bounded(0.996, ge=0, le=1)
    # zero_based: the update after optimizer step i (from 0) uses the cosine at i / total, the base
    # momentum first (the DINO reference) | one_based: at (i + 1) / total (before this option).
    momentum_index: Literal["zero_based", "one_based"] = "zero_based"
    # The weight-normalized last layer's direction v: linear_default: nn.Linear's init, U(+-1/sqrt(in)),
    # row norm ~0.58 at bottleneck 256 (the DINO reference) | trunc_normal: std 0.02, row norm ~0.32.
    last_layer_init: Literal["linear_default", "trunc_normal"] = "linear_default"
    # The last head layer gets no updates for this many steps (DINO: 1 epoch).
    freeze_last_layer_steps: int = bounded(0, ge=0)
    # The head's input: the cls token (the paper) | the mean of the patch tokens.
    pool: FeaturePool = "cls"


class DINO(Method):
    num_global_views = 2
    num_visuals = 4

    def __init__(
        self,
        backbone: VisionTransformer,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = True,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: int = 0,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        freeze_last_layer_steps: int = 0,
        pool: str = "cls",
        warmup_teacher_temp_epochs: int = 0,
        steps_per_epoch: int = 0,
        momentum_index: str = "zero_based",
        last_layer_init: str = "linear_default",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        teacher_backbone: VisionTransformer | None = None,
        teacher_head: DINOHead | None = None,
    ) -> None:
        """`teacher_backbone`, `teacher_head`: the teacher's own builds (DINOv2's has no stochastic depth, a
        distilled teacher its own width); default copies of the student's."""
        super().__init__()
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp, self.warmup_teacher_temp_steps = warmup_teacher_temp, warmup_teacher_temp_steps
        self.warmup_teacher_temp_epochs, self.steps_per_epoch = warmup_teacher_temp_epochs, steps_per_epoch
        if warmup_teacher_temp_epochs and steps_per_epoch <= 0:
            raise ValueError("a teacher temperature warm-up in epochs needs steps_per_epoch > 0")
        self.momentum_index = momentum_index
        self.center_momentum, self.base_momentum = center_momentum, momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.pool = pool  # what the head sees: the cls token (the paper) or the mean patch token
        self.image_mean, self.image_std = mean, std
        self.backbone = backbone
        self.head = DINOHead(
            backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, head_layers, norm_last_layer, last_layer_init
        )
        self.teacher_backbone = copy.deepcopy(backbone) if teacher_backbone is None else teacher_backbone
        self.teacher_head = copy.deepcopy(self.head) if teacher_head is None else teacher_head
        for param in [*self.teacher_backbone.parameters(), *self.teacher_head.parameters()]:
            param.requires_grad_(False)
        self.register_buffer("center", torch.zeros(out_dim))
        # Optimizer steps taken, as a tensor in the checkpoint: schedules read it without a host sync.
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.init_weights()
        self.teacher_backbone.init_weights()
        self.copy_online_to_averaged()
        self.center.zero_()
        self.steps_done.zero_()

    def inference_network(self) -> VisionTransformer:
        return self.teacher_backbone  # the teacher is the better encoder and the one DINO evaluates

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [self.backbone.blocks, self.teacher_backbone.blocks]

    def no_weight_decay(self) -> set[str]:
        names = {f"backbone.{name}" for name in self.backbone.no_weight_decay()}
        return names | ({"head.last_layer.weight_g"} if self.head.last_layer.weight_g is not None else set())

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.teacher_backbone, self.backbone), (self.teacher_head, self.head)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """`step` is the number of optimizer steps taken (1 after the first)."""
        index = step - 1 if self.momentum_index == "zero_based" else step
        return cosine_ramp(index, total_steps, self.base_momentum, 1.0)

    def on_step_end(self, step: int, total_steps: int) -> None:
        self.steps_done += 1

    def teacher_temperature(self) -> Tensor:
        """Linear warm-up from warmup_teacher_temp to teacher_temp, then constant: per epoch (the reference's
        linspace over the warm-up epochs, indexed by the epoch) or per step."""
        if self.warmup_teacher_temp_epochs > 0:
            epoch = torch.div(self.steps_done, self.steps_per_epoch, rounding_mode="floor").float()
            last = self.warmup_teacher_temp_epochs - 1
            progress = (epoch / last).clamp(max=1.0) if last > 0 else torch.ones_like(epoch)
            return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * progress
        if self.warmup_teacher_temp_steps <= 0:
            return torch.tensor(self.teacher_temp, device=self.steps_done.device)
        progress = (self.steps_done.float() / self.warmup_teacher_temp_steps).clamp(max=1.0)
        return self.warmup_teacher_temp + (self.teacher_temp - self.warmup_teacher_temp) * progress

    def student_features(self, views: list[Tensor], pool: str) -> list[Tensor]:
        """Pooled student features of `views`, in order: consecutive views of one size share a backbone pass."""
        features, start = [], 0
        while start < len(views):
            end = start
            while end < len(views) and views[end].shape == views[start].shape:
                end += 1
            features.append(self.backbone.forward_features(torch.cat(views[start:end]), pool=pool))
            start = end
        return features

    def student_outputs(self, views: list[Tensor]) -> Tensor:
        """[V, B, K]: views of one size share a backbone pass; all share one head pass."""
        batch = views[0].shape[0]
        features = self.student_features(views, self.pool)
        frozen = self.steps_done < self.freeze_last_layer_steps
        logits = self.head(torch.cat(features), freeze_last_layer=frozen)
        return logits.view(len(views), batch, -1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) < self.num_global_views:
            raise ValueError("DINO needs batch['image'] as a list of >= 2 views (the dino train transform)")
        student = self.student_outputs(list(views))
        with torch.no_grad():
            globals_ = torch.cat(list(views[: self.num_global_views]))
            teacher = self.teacher_head(self.teacher_backbone.forward_features(globals_, pool=self.pool))
            teacher = teacher.view(self.num_global_views, -1, teacher.shape[-1])
        temperature = self.teacher_temperature()
        loss = dino_loss(student, teacher, self.center, self.student_temp, temperature)
        with torch.no_grad():
            probs = teacher_probabilities(teacher, self.center, temperature)
            entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
            self.update_center(teacher)
        return {"loss": loss, "teacher_entropy": entropy, "teacher_temp": temperature.detach().float()}

    @torch.no_grad()
    def update_center(self, teacher_logits: Tensor) -> None:
        """EMA of the teacher's mean output over the global batch."""
        batch_center = all_reduce_mean(teacher_logits.float().mean(dim=(0, 1)))
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The inference network's (the teacher's) last-layer cls attention per head, under each input image (row 1)."""
        images = batch["image"][0][: self.num_visuals]
        maps = self.inference_network().last_attention(images)  # [N, heads, h, w]
        maps = F.interpolate(maps, size=images.shape[-2:], mode="nearest")
        low = maps.amin(dim=(2, 3), keepdim=True)
        high = maps.amax(dim=(2, 3), keepdim=True)
        maps = (maps - low) / (high - low).clamp_min(1e-12)
        rows = [denormalize(images.float(), self.image_mean, self.image_std)]
        rows += [maps[:, head : head + 1].expand(-1, 3, -1, -1) for head in range(maps.shape[1])]
        return {"attention": image_grid(torch.cat(rows), nrow=images.shape[0])}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_vit_backbone(cfg)
    dino = cfg.method.dino
    if dino.warmup_teacher_temp_epochs and dino.warmup_teacher_temp_steps:
        raise ConfigError(
            "method.dino.warmup_teacher_temp_epochs: set the warm-up in epochs or in steps "
            f"(warmup_teacher_temp_steps = {dino.warmup_teacher_temp_steps}), not both"
        )
    if cfg.data.local_crops and cfg.data.local_crop_size % cfg.model.patch_size:
        raise ConfigError(
            f"data.local_crop_size: {cfg.data.local_crop_size} is not a multiple of model.patch_size {cfg.model.patch_size}"
        )


def steps_per_epoch(cfg: Config, fixed: int | None = None) -> int:
    """`fixed` (default method.dino.steps_per_epoch), else the training samples in the manifest // the global
    batch; 0 when the manifest cannot be read (a method rebuilt from a checkpoint for evaluation needs no schedule)."""
    fixed = cfg.method.dino.steps_per_epoch if fixed is None else fixed
    if fixed:
        return fixed
    try:
        samples = Manifest.load(cfg.data.shards).num_samples("train")
    except (FileNotFoundError, ValueError, NotADirectoryError, OSError):
        return 0
    return max(1, samples // (cfg.data.batch_size * cfg.optim.accum_steps * world_size()))


def train_transform(cfg: Config):
    """The views; a schedule given in epochs is checked here, where training needs the data anyway."""
    if cfg.method.dino.warmup_teacher_temp_epochs and not steps_per_epoch(cfg):
        raise ConfigError(
            "method.dino.warmup_teacher_temp_epochs: steps per epoch come from the manifest of data.shards "
            f"({cfg.data.shards}), which cannot be read; set method.dino.steps_per_epoch"
        )
    return joint_embedding_transform(cfg)


def build(cfg: Config) -> DINO:
    dino = cfg.method.dino
    epoch_steps = steps_per_epoch(cfg) if dino.warmup_teacher_temp_epochs else 0
    return DINO(
        build_vit_backbone(cfg),
        out_dim=dino.out_dim,
        hidden_dim=dino.hidden_dim,
        bottleneck_dim=dino.bottleneck_dim,
        head_layers=dino.head_layers,
        norm_last_layer=dino.norm_last_layer,
        student_temp=dino.student_temp,
        teacher_temp=dino.teacher_temp,
        warmup_teacher_temp=dino.warmup_teacher_temp,
        warmup_teacher_temp_steps=dino.warmup_teacher_temp_steps,
        center_momentum=dino.center_momentum,
        momentum=dino.momentum,
        freeze_last_layer_steps=dino.freeze_last_layer_steps,
        pool=dino.pool,
        warmup_teacher_temp_epochs=dino.warmup_teacher_temp_epochs if epoch_steps else 0,
        steps_per_epoch=epoch_steps,
        momentum_index=dino.momentum_index,
        last_layer_init=dino.last_layer_init,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """Student: backbone + head on the 2 global and data.local_crops local views; teacher (forward only):
    backbone + head on the 2 global views; the loss's cross-entropy of every (teacher, student) view pair,
    a product over the out_dim prototypes."""
    dino, dim = cfg.method.dino, vit_width(cfg)
    head_dims = [dim] + [dino.hidden_dim] * (dino.head_layers - 1) + [dino.bottleneck_dim, dino.out_dim]
    view = lambda size: vit_backbone_flops(cfg, size) + FlopCount(mlp_flops(head_dims))  # noqa: E731
    global_view, local_view = view(cfg.data.image_size), view(cfg.data.local_crop_size)
    views = 2 + cfg.data.local_crops
    cross_entropy = linear_flops(2, views, dino.out_dim)
    student = FlopCount(2 * global_view.trained + cfg.data.local_crops * local_view.trained + cross_entropy)
    teacher = FlopCount(0.0, 2 * global_view.trained)
    return student + teacher


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the student on 2 global + data.local_crops local views, its head and the loss over
    out_dim prototypes; the teacher runs without grad."""
    dino, data, model = cfg.method.dino, cfg.data, cfg.model
    dim, depth, heads = VIT_SIZES[cfg.model.size]
    views = [(data.image_size // model.patch_size) ** 2 + 1] * 2
    views += [(data.local_crop_size // model.patch_size) ** 2 + 1] * data.local_crops
    block_total = sum(blocks_bytes(vit_block(t, dim, heads, act), t * dim * act, depth, checkpointing) for t in views)
    hidden_layers = dino.head_layers - 1
    head = (dim + hidden_layers * 3 * dino.hidden_dim + 2 * dino.bottleneck_dim) * act
    logits = dino.out_dim * (act + 2 * STAT)  # logits, and the fp32 log-softmax the cross-entropy keeps
    return {
        "backbone blocks": block_total,
        "patch embedding inputs": model.in_chans
        * (2 * data.image_size**2 + data.local_crops * data.local_crop_size**2)
        * act,
        "final norms": sum(layer_norm_bytes(t, dim, act) for t in views),
        "head (MLP, bottleneck, prototypes)": len(views) * (head + logits),
    }


def collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """The center's all-reduce."""
    return [Collective("DINO center", "all_reduce", cfg.method.dino.out_dim * STAT, 1)]


def synthetic_overrides(cfg: Config) -> list[str]:
    """Without shards there is no manifest to count an epoch from; the warm-up's length does not change the compute."""
    dino = cfg.method.dino
    return ["method.dino.steps_per_epoch=1000"] if dino.warmup_teacher_temp_epochs and not dino.steps_per_epoch else []


SPEC = MethodSpec(
    "dino",
    DINOConfig,
    build,
    train_transform,
    validate=validate,
    device_transform=joint_embedding_device_transform,
    flops=flops,
    activations=activations,
    collectives=collectives,
    averaged_network_runs_forward=True,
    crop_views=joint_embedding_crop_views,
    synthetic_overrides=synthetic_overrides,
)
