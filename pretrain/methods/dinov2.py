"""DINOv2 (Oquab et al. 2024): DINO's cls-token self-distillation plus iBOT's masked patch-token
distillation, the KoLeo regularizer, and Sinkhorn-Knopp teacher targets, on a ViT with LayerScale,
stochastic depth in the student and optionally registers and SwiGLU (pretrain/models/vit.py).

The losses follow the released code (dinov2/train/ssl_meta_arch.py, dinov2/loss/):
- DINO: the mean over (teacher global view, other student view) pairs of the batch-mean cross-entropy of
  the cls tokens through the DINO head; the student's global crops carry the iBOT masks, the teacher's not.
- iBOT: the student's masked patch tokens against the teacher's patch tokens at the same places, through the
  DINO head (shared) or an iBOT head of their own; per global crop the mean over its masked tokens, averaged
  over all global crops, masked or not (forward_masked, whose x2 and x1/2 scales cancel in the release).
- KoLeo: on the student's normalized cls tokens, within each global crop of this rank's batch, summed over
  the crops.
Teacher targets are Sinkhorn-Knopp's (3 iterations, sums reduced over ranks) or DINO's centering, one
center for the cls outputs (the mean over the global batch) and one for the patch outputs (each rank's mean
over its masked tokens, averaged over ranks, as the release updates it).

Distillation (the paper's section 5; the release has no code for it): with `teacher_checkpoint` the teacher
is a frozen, pretrained dino or dinov2 network (backbone and heads, of any size) instead of the student's
EMA. As the paper says, the student then sees no iBOT masks: the patch loss covers every patch of the two
global crops. Stochastic depth is the config's (the distillation recipe sets 0). A spare EMA of the student
(`ema_backbone`) is the final model. The teacher's heads are built with a trained last-layer norm, so a
teacher whose norm was fixed to 1 loads with its norms set to 1, the same function.

Deviations, each an edge of the release rather than a choice of recipe: without local crops the release
divides the two global pairs by 3 (its local-term count is max(local x 2, 1)); this averages them. The
release decays the weight-normalized last layer's norm; the optimizer here never decays 1-d parameters.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from data_pipeline.reader import derive_seed
from kernels.dino_loss import dino_cross_entropy, teacher_probabilities
from pretrain.activation_memory import STAT, Collective
from pretrain.config import Config, ConfigError, ModelConfig, bounded
from pretrain.distributed import all_reduce_mean, all_reduce_sum, rank, world_size
from pretrain.flops import FlopCount, linear_flops, mlp_flops
from pretrain.methods.backbone import (
    build_vit_backbone,
    clean_name,
    validate_vit_backbone,
    vit_backbone_flops,
    vit_layer_decay,
    vit_width,
)
from pretrain.methods.block_masking import BlockMasking, ibot_masks
from pretrain.methods.dino import DINO, steps_per_epoch
from pretrain.methods.dino import activations as dino_activations
from pretrain.methods.dino import validate as validate_dino_views
from pretrain.methods.dinov2_losses import ibot_patch_loss, koleo_loss, sinkhorn_knopp
from pretrain.methods.joint_embedding import (
    joint_embedding_crop_views,
    joint_embedding_device_transform,
    joint_embedding_transform,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.heads import DINOHead
from pretrain.models.vit import VisionTransformer
from pretrain.visualize import pca_grid


@dataclass
class DINOv2Config:
    """method.dinov2: the released defaults (dinov2/configs/ssl_default_config.yaml) unless a recipe sets them."""

    # The DINO head (cls tokens): 65,536 prototypes, a 3-layer MLP to a 256-d bottleneck.
    out_dim: int = bounded(65536, gt=0)
    hidden_dim: int = bounded(2048, gt=0)
    bottleneck_dim: int = bounded(256, gt=0)
    head_layers: int = bounded(3, gt=0)
    # The release trains the weight-normalized last layer's norm (weight_g starts at 1) and leaves its
    # direction at nn.Linear's init (dinov2/layers/dino_head.py).
    norm_last_layer: bool = False
    last_layer_init: Literal["linear_default", "trunc_normal"] = "linear_default"
    student_temp: float = bounded(0.1, gt=0)
    teacher_temp: float = bounded(0.07, gt=0)
    warmup_teacher_temp: float = bounded(0.04, gt=0)
    warmup_teacher_temp_steps: int = bounded(0, ge=0)
    # > 0: the warm-up in epochs, DINO's per-epoch schedule (pretrain/methods/dino.py).
    warmup_teacher_temp_epochs: int = bounded(0, ge=0)
    steps_per_epoch: int = bounded(0, ge=0)
    # Teacher EMA momentum, raised to 1 on a cosine.
    momentum: float = bounded(0.992, ge=0, le=1)
    freeze_last_layer_steps: int = bounded(0, ge=0)
    # sinkhorn_knopp (DINOv2) | centering (DINO's momentum center, one for cls and one for patch outputs).
    centering: Literal["sinkhorn_knopp", "centering"] = "centering"
    sinkhorn_iterations: int = bounded(3, ge=1)
    center_momentum: float = bounded(0.9, ge=0, lt=1)
    dino_weight: float = bounded(1.0, ge=0)
    # iBOT: 0 turns masking off.
    ibot_weight: float = bounded(1.0, ge=0)
    # The patch tokens go through a head of their own (ViT-g/14's recipe) instead of the DINO head.
    ibot_separate_head: bool = False
    ibot_out_dim: int = bounded(65536, gt=0)
    ibot_hidden_dim: int = bounded(2048, gt=0)
    ibot_bottleneck_dim: int = bounded(256, gt=0)
    # Share of the global crops that get masks, and the range of their masked fractions.
    mask_probability: float = bounded(0.5, ge=0, le=1)
    mask_ratio_min: float = bounded(0.1, ge=0, le=1)
    mask_ratio_max: float = bounded(0.5, ge=0, le=1)
    # KoLeo on the student's cls tokens: needs 2 or more samples per rank's micro-batch.
    koleo_weight: float = bounded(0.1, ge=0)
    # The student's stochastic depth (the teacher has none): rate, uniform over blocks or timm's linear rule.
    drop_path_rate: float = bounded(0.3, ge=0, lt=1)
    drop_path_uniform: bool = True
    # Layer-wise learning-rate decay of the student's blocks, and the patch embedding's extra factor.
    layer_decay: float = bounded(0.9, gt=0, le=1)
    patch_embed_lr_mult: float = bounded(0.2, gt=0)
    # Distillation: a DCP checkpoint of a dino or dinov2 run (trained here, or from `ckpt import`) whose EMA
    # teacher, backbone and heads, is this run's frozen teacher; "" for self-distillation.
    teacher_checkpoint: str = ""
    # The teacher's network as its run built it (that run's `model` section and `data.image_size`), so a
    # distilled run rebuilds without the teacher's files. Checked against the checkpoint before any work;
    # the error lists the values to set. The teacher runs model.attn_backend, the student's kernel.
    teacher_model: ModelConfig = field(default_factory=ModelConfig)
    teacher_image_size: int = bounded(224, gt=0)


class DINOv2(DINO):
    def __init__(
        self,
        backbone: VisionTransformer,
        teacher_backbone: VisionTransformer,
        cfg: DINOv2Config,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        epoch_steps: int = 0,
        seed: int = 0,
        ema_backbone: VisionTransformer | None = None,
    ) -> None:
        """`seed`: the run's, from which the iBOT masks of every step and micro-batch are drawn.
        `ema_backbone`: a distillation's spare EMA of the student (built without stochastic depth or mask
        token); with it, `teacher_backbone` is the frozen teacher, loaded by the loop (`teacher_state`)."""
        self.ibot_separate_head = cfg.ibot_separate_head
        self.distilling = ema_backbone is not None
        self._heads_built = False  # DINO's constructor initializes before the iBOT heads exist
        head_dims = (cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim, cfg.head_layers)
        # A distilled teacher's heads take its width; their last-layer norm is a parameter, so any teacher
        # loads (a norm fixed to 1 is the same function as a norm of 1).
        teacher_head = DINOHead(teacher_backbone.embed_dim, *head_dims, False) if self.distilling else None
        super().__init__(
            backbone,
            out_dim=cfg.out_dim,
            hidden_dim=cfg.hidden_dim,
            bottleneck_dim=cfg.bottleneck_dim,
            head_layers=cfg.head_layers,
            norm_last_layer=cfg.norm_last_layer,
            student_temp=cfg.student_temp,
            teacher_temp=cfg.teacher_temp,
            warmup_teacher_temp=cfg.warmup_teacher_temp,
            warmup_teacher_temp_steps=cfg.warmup_teacher_temp_steps,
            center_momentum=cfg.center_momentum,
            momentum=cfg.momentum,
            freeze_last_layer_steps=cfg.freeze_last_layer_steps,
            warmup_teacher_temp_epochs=cfg.warmup_teacher_temp_epochs if epoch_steps else 0,
            steps_per_epoch=epoch_steps,
            last_layer_init=cfg.last_layer_init,
            mean=mean,
            std=std,
            teacher_backbone=teacher_backbone,
            teacher_head=teacher_head,
        )
        self.centering, self.sinkhorn_iterations = cfg.centering, cfg.sinkhorn_iterations
        self.dino_weight, self.ibot_weight, self.koleo_weight = cfg.dino_weight, cfg.ibot_weight, cfg.koleo_weight
        self.mask_probability, self.mask_ratio = cfg.mask_probability, (cfg.mask_ratio_min, cfg.mask_ratio_max)
        self.layer_decay, self.patch_embed_lr_mult = cfg.layer_decay, cfg.patch_embed_lr_mult
        self.depth = len(backbone.blocks)
        self.masking = BlockMasking(backbone.grid_size)
        if self.ibot_separate_head:
            dims = (cfg.ibot_out_dim, cfg.ibot_hidden_dim, cfg.ibot_bottleneck_dim, cfg.head_layers)
            self.ibot_head = DINOHead(backbone.embed_dim, *dims, cfg.norm_last_layer, cfg.last_layer_init)
            if self.distilling:
                self.teacher_ibot_head = DINOHead(teacher_backbone.embed_dim, *dims, False).requires_grad_(False)
            else:
                self.teacher_ibot_head = copy.deepcopy(self.ibot_head).requires_grad_(False)
        if self.distilling:
            self.ema_backbone = ema_backbone.requires_grad_(False)
        patch_dim = cfg.ibot_out_dim if self.ibot_separate_head else cfg.out_dim
        self.register_buffer("patch_center", torch.zeros(patch_dim))
        self.seed = seed
        # Host-side copies of steps_done and of the micro-batch within the step, for the mask seeds (reading
        # the buffer on every forward would wait for the device); None until the first forward reads it.
        self._step: int | None = None
        self._micro = 0
        self._heads_built = True
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """A distilled teacher gets a random init here, replaced by the checkpoint's weights (`teacher_state`)."""
        if self._heads_built and self.ibot_separate_head:
            self.ibot_head.init_weights()
        if self.distilling:
            self.teacher_head.init_weights()
            if self._heads_built and self.ibot_separate_head:
                self.teacher_ibot_head.init_weights()
        super().init_weights()  # copies the student to the averaged networks (`ema_pairs`)
        if self._heads_built:
            self.patch_center.zero_()
            self._step, self._micro = None, 0

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(EMA teacher, student) networks; a distillation's teacher is frozen, and only its spare EMA of the
        student backbone follows the student."""
        if self.distilling:
            return [(self.ema_backbone, self.backbone)] if self._heads_built else []
        pairs = super().ema_pairs()
        if self._heads_built and self.ibot_separate_head:
            pairs.append((self.teacher_ibot_head, self.ibot_head))
        return pairs

    def inference_network(self) -> VisionTransformer:
        return self.ema_backbone if self.distilling else self.teacher_backbone

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return super().transformer_blocks() + ([self.ema_backbone.blocks] if self.distilling else [])

    def teacher_sources(self) -> tuple[str, ...]:
        """The networks a distillation reads from its teacher's checkpoint: the EMA teacher of a dino or dinov2
        run, under the same names as here."""
        return ("teacher_backbone.", "teacher_head.") + (("teacher_ibot_head.",) if self.ibot_separate_head else ())

    def teacher_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The frozen teacher's weights from its checkpoint's (`teacher_sources`): its iBOT mask token, an
        input of its student only, is dropped; a last-layer norm fixed to 1 becomes a norm of 1. Any other
        difference from this method's teacher fails, naming the tensors."""
        ours = {n: t for n, t in self.state_dict().items() if n.startswith(self.teacher_sources())}
        state = {n: t for n, t in state.items() if n != "teacher_backbone.mask_token"}
        for name, tensor in ours.items():
            if name.endswith("last_layer.weight_g") and name not in state:
                state[name] = torch.ones(tensor.shape, dtype=tensor.dtype)
        missing, unexpected = sorted(ours.keys() - state.keys()), sorted(state.keys() - ours.keys())
        wrong = [n for n in ours.keys() & state.keys() if ours[n].shape != state[n].shape]
        if missing or unexpected or wrong:
            raise ConfigError(
                "method.dinov2.teacher_checkpoint: the checkpoint's teacher does not fit method.dinov2.teacher_model "
                f"(missing: {missing[:4]}, unexpected: {unexpected[:4]}, other shapes: {sorted(wrong)[:4]})"
            )
        return state

    def on_step_end(self, step: int, total_steps: int) -> None:
        super().on_step_end(step, total_steps)
        if self._step is not None:
            self._step += 1
        self._micro = 0

    def no_weight_decay(self) -> set[str]:
        """As the release: only biases, norms and LayerScale skip weight decay (the optimizer's ndim <= 1 rule,
        which also covers the last layers' norms); tokens and the position table are decayed."""
        return set()

    def lr_scale(self, name: str) -> float:
        """DINOv2's get_vit_lr_decay_rate over the student's blocks, times patch_embed_lr_mult for the patch
        embedding; the heads train at the full rate."""
        name = clean_name(name)
        scale = vit_layer_decay(name, self.depth, self.layer_decay) if name.startswith("backbone.") else 1.0
        return scale * self.patch_embed_lr_mult if name.startswith("backbone.patch_embed.") else scale

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """DINO's attention maps, and DINOv2's PCA of the final network's patch features (`patch_pca_rgb`): the
        images above their maps, upsampled to the image size."""
        pictures = super().visuals(batch)
        images = batch["image"][0][: self.num_visuals]
        pictures["pca"], _ = pca_grid(self.inference_network(), images, self.image_mean, self.image_std)
        return pictures

    def patch_heads(self) -> tuple[nn.Module, nn.Module]:
        if self.ibot_separate_head:
            return self.ibot_head, self.teacher_ibot_head
        return self.head, self.teacher_head

    def draw_masks(self, crops: int, per_crop: int, device: torch.device) -> Tensor:
        """[crops x per_crop, L] iBOT masks of this rank's crops (all False without iBOT): this rank's rows of
        the global micro-batch (crop-major, ranks in order within a crop), drawn from (seed, step, micro-batch),
        so N ranks draw what one process draws on the whole batch."""
        if self.ibot_weight == 0 or not self.training:
            return torch.zeros(crops * per_crop, self.backbone.num_patches, dtype=torch.bool, device=device)
        if self.distilling:  # the patch loss on every patch, and no mask tokens in the student's input
            return torch.ones(crops * per_crop, self.backbone.num_patches, dtype=torch.bool, device=device)
        if self._step is None:
            self._step = int(self.steps_done)
        seed = derive_seed(self.seed, "ibot", self._step, self._micro)
        self._micro += 1
        ranks, me = world_size(), rank()
        total = crops * per_crop * ranks
        masks = [
            ibot_masks(
                range(start, start + per_crop), total, self.masking, self.mask_probability, self.mask_ratio, seed
            )
            for start in (c * per_crop * ranks + me * per_crop for c in range(crops))
        ]
        return torch.cat(masks).to(device, non_blocking=True)

    def teacher_targets(self, logits: Tensor, center: Tensor, temperature: Tensor, count: Tensor | None) -> Tensor:
        """Sinkhorn-Knopp over the global rows (`count` of them: iBOT's masked tokens; None: every rank's rows),
        or softmax((logits - center) / temperature) and the center's EMA toward the mean over ranks of each
        rank's mean logits (a rank without rows adds a zero mean, as the release's would add NaN)."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temperature, self.sinkhorn_iterations, count)
        probs = teacher_probabilities(logits, center, temperature)
        rank_mean = logits.float().sum(0) / max(1, logits.shape[0])
        center.mul_(self.center_momentum).add_(all_reduce_mean(rank_mean), alpha=1 - self.center_momentum)
        return probs

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) < self.num_global_views:
            raise ValueError("DINOv2 needs batch['image'] as a list of >= 2 views (the dinov2 train transform)")
        crops = self.num_global_views
        per_crop = views[0].shape[0]
        global_images = torch.cat(list(views[:crops]))
        masks = self.draw_masks(crops, per_crop, global_images.device)

        tokens = self.backbone.forward_tokens(global_images, masks=None if self.distilling else masks)
        cls = tokens[:, 0]
        cls_all = torch.cat([cls, *self.student_features(list(views[crops:]), "cls")])
        frozen = self.steps_done < self.freeze_last_layer_steps
        student_logits = self.head(cls_all, freeze_last_layer=frozen).view(len(views), per_crop, -1)
        patch_head, teacher_patch_head = self.patch_heads()
        masked_student = patch_head(self.backbone.patch_tokens(tokens)[masks], freeze_last_layer=frozen)

        temperature = self.teacher_temperature()
        with torch.no_grad():
            teacher_tokens = self.teacher_backbone.forward_tokens(global_images)
            teacher_cls = self.teacher_head(teacher_tokens[:, 0])
            teacher_patches = teacher_patch_head(self.teacher_backbone.patch_tokens(teacher_tokens)[masks])
            cls_targets = self.teacher_targets(teacher_cls, self.center, temperature, None).view(crops, per_crop, -1)
            masked_count = all_reduce_sum(masks.sum().float())
            patch_targets = self.teacher_targets(teacher_patches, self.patch_center, temperature, masked_count)

        dino = dino_cross_entropy(student_logits, cls_targets, self.student_temp)
        ibot = ibot_patch_loss(masked_student, patch_targets, masks, self.student_temp)
        koleo = sum(koleo_loss(chunk) for chunk in cls.chunk(crops)) if self.koleo_weight else cls.new_zeros(())
        loss = self.dino_weight * dino + self.ibot_weight * ibot + self.koleo_weight * koleo
        with torch.no_grad():
            entropy = -(cls_targets * cls_targets.clamp_min(1e-12).log()).sum(-1).mean()
        return {
            "loss": loss,
            "dino_loss": dino.detach(),
            "ibot_loss": ibot.detach(),
            "koleo_loss": koleo.detach(),
            "masked_tokens": masked_count / (crops * per_crop),
            "teacher_entropy": entropy,
            "teacher_temp": temperature.detach().float(),
        }


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_dino_views(cfg)
    v2 = cfg.method.dinov2
    if v2.warmup_teacher_temp_epochs and v2.warmup_teacher_temp_steps:
        raise ConfigError(
            "method.dinov2.warmup_teacher_temp_epochs: set the warm-up in epochs or in steps "
            f"(warmup_teacher_temp_steps = {v2.warmup_teacher_temp_steps}), not both"
        )
    if v2.mask_ratio_min > v2.mask_ratio_max:
        raise ConfigError(
            f"method.dinov2.mask_ratio_min: {v2.mask_ratio_min} exceeds method.dinov2.mask_ratio_max {v2.mask_ratio_max}"
        )
    if v2.teacher_checkpoint:
        validate_vit_backbone(teacher_config(cfg), "method.dinov2.teacher_model.", "method.dinov2.teacher_image_size")
    if v2.koleo_weight and cfg.data.batch_size < 2:
        raise ConfigError(
            f"method.dinov2.koleo_weight: KoLeo needs a nearest neighbour within each rank's micro-batch, and "
            f"data.batch_size is {cfg.data.batch_size}; use 2 or more, or koleo_weight = 0"
        )


def train_transform(cfg: Config):
    if cfg.method.dinov2.warmup_teacher_temp_epochs and not steps_per_epoch(cfg, cfg.method.dinov2.steps_per_epoch):
        raise ConfigError(
            "method.dinov2.warmup_teacher_temp_epochs: steps per epoch come from the manifest of data.shards "
            f"({cfg.data.shards}), which cannot be read; set method.dinov2.steps_per_epoch"
        )
    return joint_embedding_transform(cfg)


def teacher_config(cfg: Config) -> Config:
    """cfg with a distillation's teacher network in `model` and its training size in `data.image_size`; the
    teacher runs the student's attention kernel (`model.attn_backend`), one choice for the run."""
    v2 = cfg.method.dinov2
    data = dataclasses.replace(cfg.data, image_size=v2.teacher_image_size)
    model = dataclasses.replace(v2.teacher_model, attn_backend=cfg.model.attn_backend)
    return dataclasses.replace(cfg, model=model, data=data)


def build(cfg: Config) -> DINOv2:
    v2 = cfg.method.dinov2
    epoch_steps = steps_per_epoch(cfg, v2.steps_per_epoch) if v2.warmup_teacher_temp_epochs else 0
    distilling = bool(v2.teacher_checkpoint)
    student = build_vit_backbone(cfg, v2.drop_path_rate, v2.drop_path_uniform, mask_token=not distilling)
    if distilling:
        teacher, ema = build_vit_backbone(teacher_config(cfg)), build_vit_backbone(cfg)
    else:
        teacher, ema = build_vit_backbone(cfg, mask_token=True), None
    return DINOv2(
        student,
        teacher,
        v2,
        mean=cfg.data.mean,
        std=cfg.data.std,
        epoch_steps=epoch_steps,
        seed=cfg.run.seed,
        ema_backbone=ema,
    )


# Settings of a teacher's network that do not change the frozen function: the attention kernel, the random
# init (replaced by the checkpoint's weights), stochastic depth (a teacher has none).
_TEACHER_FREE = ("attn_backend", "init", "drop_path_mode")


def check_teacher(cfg: Config, teacher: Config) -> None:
    """Before any work: the teacher checkpoint's run (`teacher`, its saved config) is a self-distilled dino or
    dinov2 run whose network is method.dinov2.teacher_model at teacher_image_size, and whose heads have this
    run's prototypes and sizes (the student learns the teacher's prototype distributions)."""
    v2 = cfg.method.dinov2
    source = f"the teacher {v2.teacher_checkpoint}"
    name = teacher.method.name
    if name not in ("dino", "dinov2") or (name == "dinov2" and teacher.method.dinov2.teacher_checkpoint):
        kind = "distilled dinov2" if name == "dinov2" else repr(name)
        raise ConfigError(
            f"method.dinov2.teacher_checkpoint: {source} is a {kind} run; a teacher is a self-distilled dino or "
            "dinov2 run's EMA teacher"
        )
    if name == "dino" and teacher.method.dino.pool != "cls":
        raise ConfigError(f"method.dinov2.teacher_checkpoint: {source}'s head was trained on mean patch tokens")
    wrong = [
        (f"teacher_model.{key}", getattr(teacher.model, key), getattr(v2.teacher_model, key))
        for key in vars(teacher.model)
        if key not in _TEACHER_FREE and getattr(teacher.model, key) != getattr(v2.teacher_model, key)
    ]
    if teacher.data.image_size != v2.teacher_image_size:
        wrong.append(("teacher_image_size", teacher.data.image_size, v2.teacher_image_size))
    heads = teacher.method.dino if name == "dino" else teacher.method.dinov2
    wrong += [
        (key, getattr(heads, key), getattr(v2, key))
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers")
        if getattr(heads, key) != getattr(v2, key)
    ]
    separate = name == "dinov2" and teacher.method.dinov2.ibot_separate_head
    if separate != v2.ibot_separate_head:
        wrong.append(("ibot_separate_head", separate, v2.ibot_separate_head))
    elif separate:
        wrong += [
            (key, getattr(heads, key), getattr(v2, key))
            for key in ("ibot_out_dim", "ibot_hidden_dim", "ibot_bottleneck_dim")
            if getattr(heads, key) != getattr(v2, key)
        ]
    if wrong:
        settings = " ".join(f"method.dinov2.{key}={_toml(saved)}" for key, saved, _ in wrong)
        raise ConfigError(
            f"method.dinov2.{wrong[0][0]}: {source} was trained with {wrong[0][1]!r}, this config says "
            f"{wrong[0][2]!r}; to take that teacher set {settings}"
        )
    size, patch = cfg.data.image_size, v2.teacher_model.patch_size
    if v2.ibot_weight and (size % patch or size // patch != size // cfg.model.patch_size):
        raise ConfigError(
            f"method.dinov2.teacher_model.patch_size: the iBOT loss pairs student and teacher patches, and at "
            f"data.image_size {size} the teacher's patch {patch} does not make the student's grid; use "
            f"model.patch_size {patch} or method.dinov2.ibot_weight = 0"
        )


def _toml(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else f'"{value}"' if isinstance(value, str) else str(value)


def _expected_masked_patches(cfg: Config) -> float:
    """Per global crop, on average: the masked share of the crops times the mean of the ratio range."""
    v2 = cfg.method.dinov2
    if not v2.ibot_weight:
        return 0.0
    patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
    if v2.teacher_checkpoint:  # a distillation's patch loss covers every patch
        return float(patches)
    return v2.mask_probability * patches * (v2.mask_ratio_min + v2.mask_ratio_max) / 2


def flops(cfg: Config) -> FlopCount:
    """Student: backbone on 2 global + data.local_crops local views, the DINO head on every view's cls token
    and the patch head on the masked tokens (their expected count; a distillation's: every patch); teacher
    (forward only, a distillation's own network): backbone and the heads on the 2 global views; DINO's
    cross-entropy over the prototypes (a product of view pairs; iBOT's per-token one is elementwise, which
    FLOP counts leave out)."""
    v2 = cfg.method.dinov2
    patch_out = v2.ibot_out_dim if v2.ibot_separate_head else v2.out_dim
    patch_hidden = v2.ibot_hidden_dim if v2.ibot_separate_head else v2.hidden_dim
    patch_bottleneck = v2.ibot_bottleneck_dim if v2.ibot_separate_head else v2.bottleneck_dim
    masked = _expected_masked_patches(cfg)

    def global_view(network: Config) -> tuple[float, float]:
        """(backbone and heads on one global view, the DINO head alone) of `network`'s width."""
        dim = vit_width(network)
        dino_head = mlp_flops([dim] + [v2.hidden_dim] * (v2.head_layers - 1) + [v2.bottleneck_dim, v2.out_dim])
        patch_head = mlp_flops([dim] + [patch_hidden] * (v2.head_layers - 1) + [patch_bottleneck, patch_out])
        backbone = vit_backbone_flops(network, cfg.data.image_size).trained
        return backbone + dino_head + masked * patch_head, dino_head

    student_global, dino_head = global_view(cfg)
    teacher = teacher_config(cfg) if v2.teacher_checkpoint else cfg
    teacher_global = global_view(dataclasses.replace(teacher, data=cfg.data))[0]
    local_view = vit_backbone_flops(cfg, cfg.data.local_crop_size).trained + dino_head
    views = 2 + cfg.data.local_crops
    cross_entropy = linear_flops(2, views, v2.out_dim)  # DINO's pairs of views: a product; iBOT's is elementwise
    student = 2 * student_global + cfg.data.local_crops * local_view + cross_entropy
    return FlopCount(student, 2 * teacher_global)


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """DINO's (the views, the DINO head and its logits) plus the patch head on the expected masked tokens."""
    v2 = cfg.method.dinov2
    parts = dino_activations(_as_dino(cfg), act, checkpointing)
    patch_out = v2.ibot_out_dim if v2.ibot_separate_head else v2.out_dim
    head = (vit_width(cfg) + (v2.head_layers - 1) * 3 * v2.hidden_dim + 2 * v2.bottleneck_dim) * act
    parts["iBOT head on masked tokens"] = int(2 * _expected_masked_patches(cfg) * (head + patch_out * (act + 2 * STAT)))
    return parts


def _as_dino(cfg: Config) -> Config:
    """cfg with method.dino's head sizes set to method.dinov2's, for DINO's activation model."""
    v2 = cfg.method.dinov2
    dino = dataclasses.replace(
        cfg.method.dino,
        out_dim=v2.out_dim,
        hidden_dim=v2.hidden_dim,
        bottleneck_dim=v2.bottleneck_dim,
        head_layers=v2.head_layers,
    )
    return dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, dino=dino))


def collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """Sinkhorn-Knopp's reductions (per iteration the prototype sums, for cls and patch targets), or the two centers."""
    v2 = cfg.method.dinov2
    patch_out = v2.ibot_out_dim if v2.ibot_separate_head else v2.out_dim
    if v2.centering == "centering":
        return [Collective("DINOv2 centers", "all_reduce", (v2.out_dim + patch_out + 2) * STAT, 1)]
    per_iteration = (v2.out_dim + patch_out) * STAT
    return [Collective("Sinkhorn-Knopp sums", "all_reduce", per_iteration, v2.sinkhorn_iterations)]


def synthetic_overrides(cfg: Config) -> list[str]:
    v2 = cfg.method.dinov2
    return ["method.dinov2.steps_per_epoch=1000"] if v2.warmup_teacher_temp_epochs and not v2.steps_per_epoch else []


SPEC = MethodSpec(
    "dinov2",
    DINOv2Config,
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
    teacher_checkpoint=lambda cfg: cfg.method.dinov2.teacher_checkpoint,
    check_teacher=check_teacher,
)
