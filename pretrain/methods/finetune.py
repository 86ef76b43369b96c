"""End-to-end fine-tuning: a pretrained encoder and a new classification head trained together on labels, the
measure MAE and MoCo v3 report first and SimCLR reports on 1 % and 10 % of the labels. It is a method like the
others, so a fine-tune runs on the same loop, engines, checkpoints, launchers and tracking as pretraining;
`pretrain eval finetune` (pretrain/eval/finetune.py) builds its config from a pretraining checkpoint.

The recipe parts follow MAE's fine-tuning (He et al. 2022, appendix A.1, and its main_finetune.py); each is
an option, and the defaults are MAE's ViT-B/16 values:

- layer-wise learning-rate decay (Clark et al. 2020, BEiT): the rate of block i of a depth-L ViT is scaled by
  layer_decay^(L - i), the patch embedding, cls token and positions by layer_decay^(L + 1), the head by 1;
- stochastic depth (`drop_path`, rising linearly over the blocks), mixup and cutmix with their switch
  probability, label smoothing (pretrain/methods/mixup.py), RandAugment and random erasing in the data workers
  (data_pipeline/randaugment.py, random_erasing.py);
- the feature: the mean of the patch tokens through a new LayerNorm in place of the encoder's final norm
  (MAE's global pool, `pool = "mean"`, `fc_norm = true`), or the cls token after the final norm (`"cls"`, as
  DeiT and MoCo v3 fine-tune);
- the head: one linear layer, weights truncated-normal with std 2e-5 (MAE), biases zero;
- an optional EMA of the weights (`ema_decay`, timm's ModelEmaV2; MAE does not use it). With it, the EMA
  network is what `inference_network` returns, so the final top-1 is the EMA's.

A ResNet encoder (SimCLR's semi-supervised protocol) takes the global average pool and a linear head; layer
decay, drop path, fc_norm and the EMA are ViT-only here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.augment import (
    Compose,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToTensor,
)
from data_pipeline.manifest import Manifest
from data_pipeline.randaugment import RandAugment
from data_pipeline.random_erasing import RandomErasing
from pretrain.activation_memory import STAT
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.flops import FlopCount, linear_flops
from pretrain.methods.backbone import (
    backbone_blocks,
    backbone_flops,
    backbone_width,
    build_resnet_backbone,
    build_vit_backbone,
    clean_name,
    encoder_activations,
    validate_backbone,
    validate_pool,
    vit_layer_decay,
)
from pretrain.methods.base import Method
from pretrain.methods.mixup import Mixup, soft_target_cross_entropy
from pretrain.methods.spec import MethodSpec
from pretrain.models.resnet import ResNet
from pretrain.models.vit import VisionTransformer


# Segments engines add to parameter names when they wrap blocks (activation checkpointing, compile).
@dataclass
class FinetuneConfig:
    """method.finetune"""

    # The pretraining checkpoint (a checkpoint directory, or a run directory: its latest) whose encoder is
    # fine-tuned; `pretrain eval finetune` sets it. Empty: the encoder starts at its random init (the
    # from-scratch baseline next to which fine-tuned numbers are read).
    checkpoint: str = ""
    # Classes of the head: the data's (`pretrain eval finetune` reads them from the manifest).
    num_classes: int = bounded(0, ge=0)
    # The feature the head reads: the mean of the patch tokens (MAE) or the cls token (DeiT, MoCo v3).
    pool: FeaturePool = "mean"
    # With pool = mean: a new LayerNorm on the pooled tokens replaces the encoder's final norm (MAE's fc_norm).
    fc_norm: bool = True
    # Std of the head's truncated-normal weight init (MAE: 2e-5).
    head_init_std: float = bounded(2e-5, gt=0)
    # Layer-wise learning-rate decay (MAE: ViT-B 0.65, ViT-L 0.75; 1 = none).
    layer_decay: float = bounded(0.65, gt=0, le=1)
    # Stochastic depth at the last block, rising linearly from 0 at the first (MAE: ViT-B 0.1, ViT-L 0.2).
    drop_path: float = bounded(0.1, ge=0, lt=1)
    # Mixup and cutmix Beta(alpha, alpha) parameters (0: off), the probability of mixing a batch at all, and of
    # cutmix rather than mixup when both are on (MAE: 0.8, 1.0, 1.0, 0.5).
    mixup: float = bounded(0.8, ge=0)
    cutmix: float = bounded(1.0, ge=0)
    mixup_prob: float = bounded(1.0, ge=0, le=1)
    mixup_switch_prob: float = bounded(0.5, ge=0, le=1)
    label_smoothing: float = bounded(0.1, ge=0, lt=1)
    # RandAugment: ops per image (0: off), magnitude and its per-op noise std (MAE: rand-m9-mstd0.5-inc1).
    randaugment_ops: int = bounded(2, ge=0)
    randaugment_magnitude: float = bounded(9.0, ge=0, le=10)
    randaugment_magnitude_std: float = bounded(0.5, ge=0)
    # Random erasing probability (MAE: 0.25, one box, per-pixel normal fill).
    random_erasing: float = bounded(0.25, ge=0, le=1)
    # EMA of the weights, used for evaluation (0: off; timm's usual 0.9999).
    ema_decay: float = bounded(0.0, ge=0, lt=1)


class Classifier(nn.Module):
    """An encoder and a linear head on its pooled feature; `forward_features` is what kNN and the linear probe
    read of a fine-tuned network."""

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        num_classes: int,
        pool: str = "mean",
        fc_norm: bool = False,
        head_init_std: float = 2e-5,
    ) -> None:
        super().__init__()
        self.backbone, self.pool = backbone, pool
        self.embed_dim = backbone.embed_dim
        if fc_norm:  # the encoder's final norm is replaced, not stacked (MAE deletes it)
            backbone.norm = nn.Identity()
        self.fc_norm = nn.LayerNorm(self.embed_dim, eps=1e-6) if fc_norm else nn.Identity()
        self.head = nn.Linear(self.embed_dim, num_classes)
        self.head_init_std = head_init_std
        self.init_head()

    @torch.no_grad()
    def init_head(self) -> None:
        nn.init.trunc_normal_(self.head.weight, std=self.head_init_std)
        nn.init.zeros_(self.head.bias)
        if isinstance(self.fc_norm, nn.LayerNorm):
            self.fc_norm.reset_parameters()

    def forward_features(self, images: Tensor, pool: str | None = None) -> Tensor:
        return self.fc_norm(self.backbone.forward_features(images, pool or self.pool))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.forward_features(images))


class FineTune(Method):
    def __init__(
        self, classifier: Classifier, label_smoothing: float = 0.0, ema_decay: float = 0.0, layer_decay: float = 1.0
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.label_smoothing, self.ema_decay, self.layer_decay = label_smoothing, ema_decay, layer_decay
        self.ema = copy.deepcopy(classifier).requires_grad_(False) if ema_decay > 0 else None
        backbone = classifier.backbone
        self.depth = len(backbone.blocks) if isinstance(backbone, VisionTransformer) else 0

    @torch.no_grad()
    def init_weights(self) -> None:
        """After the engine materialized a meta-built method: fresh init; the loop then loads `initial_state`."""
        self.classifier.backbone.init_weights()
        self.classifier.init_head()
        self.copy_online_to_averaged()

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        logits = self.classifier(batch["image"]).float()
        if "target" in batch:  # mixed by the device transform: soft targets with the smoothing inside
            loss = soft_target_cross_entropy(logits, batch["target"])
        else:
            loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.label_smoothing)
        # Against each image's own label: under mixup, the label of the larger part most of the time.
        top1 = (logits.argmax(dim=-1) == batch["label"]).float().mean()
        return {"loss": loss, "train_top1": top1.detach()}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.ema, self.classifier)] if self.ema is not None else []

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return self.ema_decay

    def inference_network(self) -> Classifier:
        return self.ema if self.ema is not None else self.classifier

    def test_classifier(self) -> Classifier:
        return self.inference_network()

    def transformer_blocks(self) -> list:
        networks = [self.classifier] + ([self.ema] if self.ema is not None else [])
        return [blocks for network in networks for blocks in backbone_blocks(network.backbone)]

    def no_weight_decay(self) -> set[str]:
        """The cls token and a trained position table (MAE's no_weight_decay list); biases and norms by ndim."""
        backbone = self.classifier.backbone
        if not isinstance(backbone, VisionTransformer):
            return set()
        names = {"cls_token"} | ({"pos_embed"} if isinstance(backbone.pos_embed, nn.Parameter) else set())
        return {f"classifier.backbone.{name}" for name in names}

    def lr_scale(self, name: str) -> float:
        """layer_decay^(L + 1 - layer id), with ids as MAE's `get_layer_id_for_vit`: 0 for the patch embedding,
        cls token and positions, i + 1 for block i, L + 1 for everything after the blocks (head, fc_norm)."""
        if self.layer_decay == 1.0 or not self.depth:
            return 1.0
        return vit_layer_decay(clean_name(name).removeprefix("classifier."), self.depth, self.layer_decay)

    def initial_state(self, encoder: dict[str, Tensor]) -> dict[str, Tensor]:
        """The pretrained encoder under this method's names, for the classifier and its EMA. MAE's fine-tune
        drops the encoder's final norm where fc_norm replaces it, and every fine-tune iBOT's mask token (DINOv2),
        which only masked pretraining reads; every other weight must fit exactly."""
        backbone = self.classifier.backbone
        if isinstance(backbone, VisionTransformer) and isinstance(backbone.norm, nn.Identity):
            encoder = {name: t for name, t in encoder.items() if not name.startswith("norm.")}
        encoder = {name: t for name, t in encoder.items() if name != "mask_token"}
        expected = backbone.state_dict()
        for name, tensor in encoder.items():
            if name not in expected or expected[name].shape != tensor.shape:
                have = tuple(expected[name].shape) if name in expected else "no such parameter"
                raise ConfigError(
                    f"method.finetune.checkpoint: the encoder does not fit this network: {name} is "
                    f"{tuple(tensor.shape)} there, {have} here (model.* and data.image_size must match the "
                    "pretraining run's)"
                )
        missing = sorted(set(expected) - set(encoder))
        if missing:
            raise ConfigError(f"method.finetune.checkpoint: the encoder lacks weights {missing[:5]}")
        networks = ["classifier"] + (["ema"] if self.ema is not None else [])
        return {f"{net}.backbone.{name}": tensor for net in networks for name, tensor in encoder.items()}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    ft = cfg.method.finetune
    validate_backbone(cfg)
    validate_pool(cfg, ft.pool, "method.finetune.pool")
    if not ft.num_classes:
        raise ConfigError(
            "method.finetune.num_classes: set the data's number of classes (`pretrain eval finetune` reads it "
            "from the manifest)"
        )
    if cfg.model.arch != "vit":
        for key, value, neutral in (
            ("fc_norm", ft.fc_norm, False),
            ("layer_decay", ft.layer_decay, 1.0),
            ("drop_path", ft.drop_path, 0.0),
            ("ema_decay", ft.ema_decay, 0.0),
        ):
            if value != neutral:
                raise ConfigError(
                    f"method.finetune.{key}: {value!r} applies to ViT encoders; model.arch={cfg.model.arch!r} "
                    f"needs {neutral!r}"
                )
    elif ft.fc_norm and ft.pool != "mean":
        raise ConfigError("method.finetune.fc_norm: MAE's fc_norm normalizes the mean-pooled tokens; set pool='mean'")
    if (ft.mixup or ft.cutmix) and ft.mixup_prob and cfg.data.batch_size % 2:
        raise ConfigError(
            f"data.batch_size: mixup and cutmix pair each image with the reversed batch and need an even batch, "
            f"got {cfg.data.batch_size}"
        )
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: fine-tuning uses one view per image, got {cfg.data.local_crops}")


def data_classes(shards: str) -> int | None:
    """Classes the data's manifest names; None when the shards have none (brace patterns, URLs)."""
    try:
        return len(Manifest.load(shards).classes)
    except (FileNotFoundError, ValueError, NotADirectoryError, OSError):
        return None


def preflight(cfg: Config) -> None:
    """The head fits the data's classes."""
    ft = cfg.method.finetune
    classes = data_classes(cfg.data.shards) if cfg.data.shards else None
    if classes is not None and ft.num_classes != classes:
        more = ft.num_classes > classes
        raise ConfigError(
            f"method.finetune.num_classes: the head has {ft.num_classes} classes, the data at {cfg.data.shards} "
            + (f"only {classes}" if more else f"{classes}: labels past {ft.num_classes - 1} would not fit")
        )


def build(cfg: Config) -> FineTune:
    ft = cfg.method.finetune
    if cfg.model.arch == "vit":
        backbone = build_vit_backbone(cfg, drop_path_rate=ft.drop_path)
    else:
        backbone = build_resnet_backbone(cfg)
    classifier = Classifier(backbone, ft.num_classes, ft.pool, ft.fc_norm, ft.head_init_std)
    smoothing = 0.0 if ft.mixup or ft.cutmix else ft.label_smoothing  # else Mixup smooths the soft targets
    return FineTune(classifier, smoothing, ft.ema_decay, ft.layer_decay)


def train_transform(cfg: Config) -> Compose:
    """MAE's fine-tuning augmentation: random resized crop (bicubic), flip, RandAugment, normalize, erasing."""
    data, ft = cfg.data, cfg.method.finetune
    fill = tuple(min(255, round(255 * m)) for m in data.mean)
    stages = [RandomResizedCrop(data.image_size, data.crop_scale), RandomHorizontalFlip(data.hflip)]
    if ft.randaugment_ops:
        stages.append(
            RandAugment(ft.randaugment_ops, ft.randaugment_magnitude, ft.randaugment_magnitude_std, fill=fill)
        )
    stages += [ToTensor(), Normalize(data.mean, data.std)]
    if ft.random_erasing:
        stages.append(RandomErasing(ft.random_erasing))
    return Compose(stages)


def device_transform(cfg: Config) -> Mixup | None:
    ft = cfg.method.finetune
    if not (ft.mixup or ft.cutmix) or not ft.mixup_prob:
        return None
    return Mixup(ft.num_classes, ft.mixup, ft.cutmix, ft.mixup_prob, ft.mixup_switch_prob, ft.label_smoothing)


def flops(cfg: Config) -> FlopCount:
    return backbone_flops(cfg, cfg.data.image_size) + FlopCount(
        linear_flops(1, backbone_width(cfg), cfg.method.finetune.num_classes)
    )


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """The encoder on one image, the pooled feature into the head, and the fp32 cross-entropy."""
    parts = encoder_activations(cfg, cfg.data.image_size, 1, act, checkpointing)
    return {**parts, "head and loss": backbone_width(cfg) * act + 2 * cfg.method.finetune.num_classes * STAT}


SPEC = MethodSpec(
    "finetune",
    FinetuneConfig,
    build,
    train_transform,
    validate=validate,
    device_transform=device_transform,
    flops=flops,
    activations=activations,
    preflight=preflight,
    encoder_checkpoint=lambda cfg: cfg.method.finetune.checkpoint,
)
