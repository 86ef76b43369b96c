"""Rotation prediction (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting
Image Rotations"): every image enters the batch at 0, 90, 180 and 270 degrees, and a head on the encoder
classifies which of the four rotations it sees. The paper feeds all four rotations of an image in the same
batch, which it found better than one random rotation per image; so does this method.

The paper's networks are convolutional (NIN, AlexNet, ResNet); here the encoder is the `model.*` ViT and
the head sees its pooled feature: one linear layer by default, or an MLP (`method.rotation.head_hidden_dim`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.activation_memory import STAT, blocks_bytes, layer_norm_bytes, vit_block
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.flops import FlopCount, mlp_flops
from pretrain.methods.backbone import (
    EncoderHooks,
    backbone_flops,
    backbone_width,
    build_backbone,
    encoder_activations,
    validate_backbone,
    validate_pool,
)
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.models.heads import classifier_head
from pretrain.models.resnet import ResNet
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VIT_SIZES, VisionTransformer
from pretrain.visualize import denormalize, image_grid

ROTATIONS = 4  # 0, 90, 180, 270 degrees counter-clockwise


@dataclass
class RotationConfig:
    """method.rotation"""

    # The head on the pooled feature: 0 = one linear layer, > 0 = an MLP with a hidden layer of this width.
    head_hidden_dim: int = bounded(0, ge=0)
    # What the head sees: the cls token | the mean of the patch tokens.
    pool: FeaturePool = "cls"


def rotate_batch(images: Tensor) -> tuple[Tensor, Tensor]:
    """[B, C, H, W] -> ([4B, C, H, W], labels [4B]): the batch turned by k x 90 degrees counter-clockwise for
    k = 0, 1, 2, 3, in blocks of B, each image labelled k."""
    rotated = torch.cat([torch.rot90(images, k, dims=(2, 3)) for k in range(ROTATIONS)])
    labels = torch.arange(ROTATIONS, device=images.device).repeat_interleave(images.shape[0])
    return rotated, labels


class RotationPrediction(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        head_hidden_dim: int = 0,
        pool: str = "cls",
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = classifier_head(backbone.embed_dim, head_hidden_dim, ROTATIONS)
        self.pool = pool
        self.image_mean, self.image_std = mean, std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        self.head.apply(init_linear_and_norm)

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.backbone.forward_features(images, self.pool))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images, labels = rotate_batch(batch["image"])
        logits = self.logits(images).float()
        loss = F.cross_entropy(logits, labels)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "rotation_accuracy": accuracy.detach()}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: a few images at each rotation. Bottom row: the same turned back by the *predicted*
        rotation, framed green where the prediction is right and red where it is wrong: a well-trained
        model shows an upright, green bottom row."""
        images = batch["image"][: max(1, self.num_visuals // ROTATIONS)]
        rotated, labels = rotate_batch(images)
        predicted = self.logits(rotated).argmax(dim=-1)
        shown = denormalize(rotated.float(), self.image_mean, self.image_std)
        undone = torch.stack([torch.rot90(x, -int(k), dims=(1, 2)) for x, k in zip(shown, predicted)])
        colors = torch.where(
            (predicted == labels)[:, None], shown.new_tensor([0.0, 0.8, 0.0]), shown.new_tensor([0.9, 0, 0])
        )
        framed = undone.expand(-1, 3, -1, -1).clone()
        for edge in (framed[:, :, :1, :], framed[:, :, -1:, :], framed[:, :, :, :1], framed[:, :, :, -1:]):
            edge.copy_(colors[:, :, None, None].expand_as(edge))
        return {"rotation": image_grid(torch.cat([shown.expand(-1, 3, -1, -1), framed]), nrow=len(rotated))}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    validate_pool(cfg, cfg.method.rotation.pool, "method.rotation.pool")
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: rotation prediction uses one view per image, got {cfg.data.local_crops}")


def build(cfg: Config) -> RotationPrediction:
    rotation = cfg.method.rotation
    return RotationPrediction(
        build_backbone(cfg), rotation.head_hidden_dim, rotation.pool, mean=cfg.data.mean, std=cfg.data.std
    )


def flops(cfg: Config) -> FlopCount:
    """The encoder and the head on all four rotations of the image."""
    hidden = cfg.method.rotation.head_hidden_dim
    head = mlp_flops([backbone_width(cfg), hidden, ROTATIONS] if hidden else [backbone_width(cfg), ROTATIONS])
    one = backbone_flops(cfg, cfg.data.image_size) + FlopCount(head)
    return FlopCount(ROTATIONS * one.trained, ROTATIONS * one.frozen)


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the encoder and head on each of the four rotations, and the cross-entropy."""
    data, model = cfg.data, cfg.model
    hidden = cfg.method.rotation.head_hidden_dim
    if model.arch != "vit":
        parts = encoder_activations(cfg, data.image_size, ROTATIONS, act, checkpointing)
        head = (backbone_width(cfg) + 2 * hidden) * act if hidden else backbone_width(cfg) * act
        return {**parts, "head and loss": ROTATIONS * (head + 2 * ROTATIONS * STAT)}
    dim, depth, heads = VIT_SIZES[model.size]
    tokens = (data.image_size // model.patch_size) ** 2 + 1
    head = (dim + 2 * hidden) * act if hidden else dim * act
    return {
        "encoder blocks": ROTATIONS
        * blocks_bytes(vit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": ROTATIONS * model.in_chans * data.image_size**2 * act,
        "final norm and pooling": ROTATIONS * (layer_norm_bytes(tokens, dim, act) + tokens * dim * act),
        "head and loss": ROTATIONS * (head + 2 * ROTATIONS * STAT),
    }


# A random resized crop and flip per image, as the paper trains; the rotations are made in `forward`.
SPEC = MethodSpec(
    "rotation",
    RotationConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
)
