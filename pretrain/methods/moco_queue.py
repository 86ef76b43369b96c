"""MoCo v1 (He, Fan, Wu, Xie, Girshick 2020, "Momentum Contrast for Unsupervised Visual Representation
Learning") and v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning"): a
query encoder learns to match a slowly moving key encoder's embedding of another view of the same image
against a queue of K keys from earlier batches.

- The queue is a ring buffer of K unit keys (a checkpointed buffer, the same on every rank): after each
  step the keys of the whole global batch are written in global-batch order (rank 0's first) at the
  pointer. It does not depend on the world size, so a run resumes into it at any world size; writes wrap
  around, so K need not be a multiple of the global batch (the released code requires it; where it is,
  the two agree). Until the first K keys are written, the released code's random unit keys stand in.
- The loss is the paper's equation (1): each query's positive is its own key, its negatives are the K
  queue keys (not the other keys of its batch), at temperature tau; one direction, not symmetrized.
- Shuffle BN: the released encoders keep each GPU's BatchNorm statistics to its own 32 images, and the
  key encoder gets the batch permuted across GPUs, so a key is normalized among other images than its
  query (shared statistics would let the model find its positive by them, the paper's "cheating"). Here BatchNorm
  statistics are over fixed groups of `bn_group_size` samples (pretrain/models/group_batch_norm.py), and
  the key encoder sees the global batch under a permutation drawn from the run seed and a counter, the
  same at any world size; so a run is the same on 1 process or 8.
- v2 differs from v1 by its 2-layer MLP head, blur augmentation and cosine schedule (the recipes set the
  last two), and tau 0.2 instead of 0.07.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data_pipeline.reader import derive_seed
from pretrain.activation_memory import STAT, Collective
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.distributed import all_gather_cat, rank
from pretrain.flops import FlopCount, linear_flops, mlp_flops
from pretrain.methods.backbone import (
    EncoderHooks,
    backbone_blocks,
    backbone_flops,
    backbone_width,
    build_backbone,
    encoder_activations,
    validate_backbone,
    validate_pool,
)
from pretrain.methods.base import Method
from pretrain.methods.joint_embedding import (
    joint_embedding_crop_views,
    joint_embedding_device_transform,
    joint_embedding_transform,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.group_batch_norm import convert_to_group_batch_norm
from pretrain.visualize import denormalize, match_grid


@dataclass
class MoCoV2Config:
    """method.moco_v2: the released code's defaults with its v2 flags (--mlp --moco-t 0.2 --aug-plus --cos)."""

    # 128-d keys (paper section 3.3, the released --moco-dim 128).
    proj_dim: int = bounded(128, gt=0)
    # The head: v2's Linear -> ReLU -> Linear (the released --mlp), or v1's single linear layer.
    mlp: bool = True
    # The MLP's hidden width; 0: the encoder's width, as the released code (2048 for ResNet-50).
    mlp_hidden_dim: int = bounded(0, ge=0)
    # K keys in the queue (--moco-k 65536).
    queue_size: int = bounded(65536, gt=0)
    # m of the key encoder's EMA, constant over training (--moco-m 0.999).
    momentum: float = bounded(0.999, ge=0, le=1)
    # tau (--moco-t: 0.07 for v1, 0.2 for v2).
    temperature: float = bounded(0.2, gt=0)
    # Permute the global batch before the key encoder and back after it (section 3.3).
    shuffle_bn: bool = True
    # Samples per BatchNorm group: the released per-GPU batch (256 on 8 GPUs). 0: BatchNorm over the global
    # batch, as the engines do for other methods (then shuffle_bn has no effect and must be false).
    bn_group_size: int = bounded(32, ge=0)
    # The encoder's pooled feature the head reads: a ResNet's is its global average ("mean"); a ViT's may be
    # its cls token.
    pool: FeaturePool = "mean"


@dataclass
class MoCoV1Config(MoCoV2Config):
    """method.moco_v1: the released code's defaults (a linear head, tau 0.07)."""

    mlp: bool = False
    temperature: float = bounded(0.07, gt=0)


def moco_queue_loss(query: Tensor, key: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Equation (1): mean_i -log exp(q_i.k_i / tau) / (exp(q_i.k_i / tau) + sum_j exp(q_i.queue_j / tau)),
    for unit queries [N, D], their unit keys [N, D] and the queue [K, D]; computed in at least float32.
    The N x K logits are a few MB at the paper's sizes (32 x 65,536 per GPU), so the formula is the path."""
    dtype = torch.promote_types(query.dtype, torch.float32)
    query, key, queue = query.to(dtype), key.to(dtype), queue.to(dtype)
    positive = (query * key).sum(dim=1, keepdim=True)
    logits = torch.cat([positive, query @ queue.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))


def moco_head(width: int, proj_dim: int, mlp: bool, hidden_dim: int) -> nn.Sequential:
    """v1: the encoder's fc, a linear layer to the key size; v2: Linear -> ReLU -> that fc (with biases)."""
    hidden = hidden_dim or width
    if not mlp:
        return nn.Sequential(nn.Linear(width, proj_dim))
    return nn.Sequential(nn.Linear(width, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, proj_dim))


class MoCoQueue(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        proj_dim: int = 128,
        mlp: bool = True,
        mlp_hidden_dim: int = 0,
        queue_size: int = 65536,
        momentum: float = 0.999,
        temperature: float = 0.2,
        shuffle_bn: bool = True,
        bn_group_size: int = 32,
        pool: str = "mean",
        seed: int = 0,
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.momentum, self.temperature, self.shuffle_bn, self.seed = momentum, temperature, shuffle_bn, seed
        self.pool = pool
        self.image_mean, self.image_std = image_mean, image_std
        if bn_group_size:
            convert_to_group_batch_norm(backbone, bn_group_size)
        self.backbone = backbone
        self.head = moco_head(width, proj_dim, mlp, mlp_hidden_dim)
        self.key_backbone = copy.deepcopy(backbone)
        self.key_head = copy.deepcopy(self.head)
        for param in [*self.key_backbone.parameters(), *self.key_head.parameters()]:
            param.requires_grad_(False)
        self.register_buffer("queue", torch.empty(queue_size, proj_dim))
        # Where the next keys go, and how many key batches were encoded (seeds the shuffle): int64 tensors,
        # so they checkpoint with the model and resume exactly.
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("key_batches", torch.zeros((), dtype=torch.long))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        for layer in self.head:
            if isinstance(layer, nn.Linear):
                layer.reset_parameters()  # torchvision's fc init, as the released code
        self.key_backbone.init_weights()  # then copied over; this resets its running statistics
        self.copy_online_to_averaged()
        # The released code's random unit keys, from the run seed: the same on every rank and engine.
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "moco-queue"))
        self.queue.copy_(F.normalize(torch.randn(self.queue.shape, generator=generator), dim=1))
        self.queue_ptr.zero_()
        self.key_batches.zero_()

    def transformer_blocks(self) -> list:
        return backbone_blocks(self.backbone) + backbone_blocks(self.key_backbone)

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.key_backbone, self.backbone), (self.key_head, self.head)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        return self.momentum  # constant in v1 and v2 (v3 raises it on a cosine)

    def query(self, images: Tensor) -> Tensor:
        return F.normalize(self.head(self.backbone.forward_features(images, pool=self.pool)), dim=1)

    @torch.no_grad()
    def keys(self, images: Tensor) -> Tensor:
        """This rank's unit keys. With shuffle BN the key encoder runs on this rank's slice of the global
        batch under a permutation that every rank draws alike, and the keys are put back in order."""
        if not self.shuffle_bn:
            return self._encode_keys(images)
        everyone = all_gather_cat(images)
        order = self._permutation(len(everyone)).to(images.device)
        n, r = len(images), rank()
        shuffled = self._encode_keys(everyone[order[r * n : (r + 1) * n]])
        keys = torch.empty((len(everyone), shuffled.shape[1]), dtype=shuffled.dtype, device=shuffled.device)
        keys[order] = all_gather_cat(shuffled)
        return keys[r * n : (r + 1) * n]

    def _encode_keys(self, images: Tensor) -> Tensor:
        return F.normalize(self.key_head(self.key_backbone.forward_features(images, pool=self.pool)), dim=1)

    def _permutation(self, size: int) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, "moco-shuffle", int(self.key_batches)))
        return torch.randperm(size, generator=generator)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Write the global batch's keys (rank order, then batch order) at the pointer, wrapping around."""
        everyone = all_gather_cat(keys.contiguous())
        size = self.queue.shape[0]
        slots = (self.queue_ptr + torch.arange(len(everyone), device=self.queue.device)) % size
        if len(everyone) > size:  # a global batch larger than the queue: its last K keys stay
            slots, everyone = slots[-size:], everyone[-size:]
        self.queue.index_copy_(0, slots, everyone.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(everyone)) % size)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            raise ValueError("MoCo v1/v2 needs batch['image'] as a list of 2 views (the joint-embedding transform)")
        query_images, key_images = views
        query = self.query(query_images)
        keys = self.keys(key_images)
        loss = moco_queue_loss(query, keys, self.queue.clone(), self.temperature)
        self.enqueue(keys)
        self.key_batches.add_(1)
        return {"loss": loss}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: query views of a few images; bottom row: the key view of this batch most similar to each,
        framed green where it is the query's own image and red otherwise."""
        first, second = (view[: self.num_visuals] for view in batch["image"])
        query, keys = self.query(first), self._encode_keys(second)
        nearest = (query.float() @ keys.float().T).argmax(dim=1)
        right = nearest == torch.arange(len(nearest), device=nearest.device)
        shown = denormalize(first.float(), self.image_mean, self.image_std)
        found = denormalize(second[nearest].float(), self.image_mean, self.image_std)
        return {"queries_and_nearest_keys": match_grid(shown, found, right)}


# ---------------------------------------------------------------------- the method's spec


def _validate(cfg: Config, section: str) -> None:
    validate_backbone(cfg)
    moco = getattr(cfg.method, section)
    validate_pool(cfg, moco.pool, f"method.{section}.pool")
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: MoCo uses exactly two views, got {cfg.data.local_crops}; set 0")
    if moco.shuffle_bn and (cfg.model.arch == "vit" or not moco.bn_group_size):
        why = "a ViT has no BatchNorm" if cfg.model.arch == "vit" else "BatchNorm is global (bn_group_size = 0)"
        raise ConfigError(
            f"method.{section}.shuffle_bn: {why}, so shuffling the keys' batch changes nothing; set false"
        )
    if cfg.model.arch != "vit" and moco.bn_group_size and cfg.data.batch_size % moco.bn_group_size:
        raise ConfigError(
            f"method.{section}.bn_group_size: data.batch_size {cfg.data.batch_size} per process is not a whole "
            f"number of BatchNorm groups of {moco.bn_group_size}"
        )


def _build(cfg: Config, section: str) -> MoCoQueue:
    moco = getattr(cfg.method, section)
    return MoCoQueue(
        build_backbone(cfg),
        backbone_width(cfg),
        proj_dim=moco.proj_dim,
        mlp=moco.mlp,
        mlp_hidden_dim=moco.mlp_hidden_dim,
        queue_size=moco.queue_size,
        momentum=moco.momentum,
        temperature=moco.temperature,
        shuffle_bn=moco.shuffle_bn,
        bn_group_size=moco.bn_group_size if cfg.model.arch != "vit" else 0,
        pool=moco.pool,
        seed=cfg.run.seed,
        image_mean=cfg.data.mean,
        image_std=cfg.data.std,
    )


def _flops(cfg: Config, section: str) -> FlopCount:
    """The query view through encoder and head, trained; the key view through the key encoder and head,
    forward only; the logits against the K queue keys (the positive's dot product is 2 x 128 FLOPs more)."""
    moco, width = getattr(cfg.method, section), backbone_width(cfg)
    head = [width, moco.mlp_hidden_dim or width, moco.proj_dim] if moco.mlp else [width, moco.proj_dim]
    encoder = backbone_flops(cfg, cfg.data.image_size) + FlopCount(mlp_flops(head))
    logits = FlopCount(linear_flops(1, moco.proj_dim, moco.queue_size))
    return encoder + logits + encoder.as_frozen()


def _activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the query view through the encoder and head (the key encoder runs without gradient), the
    normalized query and key in fp32, the log-softmax over 1 + K logits, and the queue copy the logits read,
    a per-batch tensor spread over data.batch_size samples."""
    moco = getattr(cfg.method, cfg.method.name)
    width, proj = backbone_width(cfg), moco.proj_dim
    head = width * act + ((moco.mlp_hidden_dim or width) * act if moco.mlp else 0) + proj * act
    return {
        **encoder_activations(cfg, cfg.data.image_size, 1, act, checkpointing),
        "head": head,
        "loss (query, key, log-softmax over 1 + K)": (2 * proj + moco.queue_size + 1) * STAT,
        "queue copy (per batch, spread over its samples)": moco.queue_size * proj * STAT // cfg.data.batch_size,
    }


def _collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """The keys all-gathered to be enqueued, and with shuffle BN the key view's images gathered and the
    shuffled keys gathered back (forward only: the key encoder has no gradient)."""
    moco = getattr(cfg.method, cfg.method.name)
    keys = micro_batch * moco.proj_dim * act
    gathers = [Collective("MoCo keys to enqueue", "all_gather", keys, 1)]
    if moco.shuffle_bn:
        image = cfg.model.in_chans * cfg.data.image_size**2 * act
        gathers += [
            Collective("shuffle BN: key images", "all_gather", micro_batch * image, 1),
            Collective("shuffle BN: shuffled keys", "all_gather", keys, 1),
        ]
    return gathers


def _spec(name: str, config: type) -> MethodSpec:
    return MethodSpec(
        name,
        config,
        lambda cfg: _build(cfg, name),
        joint_embedding_transform,
        validate=lambda cfg: _validate(cfg, name),
        device_transform=joint_embedding_device_transform,
        flops=lambda cfg: _flops(cfg, name),
        activations=_activations,
        collectives=_collectives,
        averaged_network_runs_forward=True,
        crop_views=joint_embedding_crop_views,
    )


SPEC_V1 = _spec("moco_v1", MoCoV1Config)
SPEC_V2 = _spec("moco_v2", MoCoV2Config)
