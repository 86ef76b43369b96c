"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of Visual
Representations"): two augmented views of each image go through one encoder and a 2-layer projection
head, and the NT-Xent loss pulls each view toward its partner against the other 2N - 2 views of the
global batch.

The views are the joint-embedding views (`data.*`: the recipes set SimCLR's crop, color distortion of
strength 1, grayscale and blur, the same for both views). The encoder is the `model.*` backbone: a ResNet
as in the paper, or a ViT. Both views pass the encoder and head as one batch of 2N, so BatchNorm
statistics are over both views, as in the released code (and over every rank: the engines make BatchNorm
global). The embeddings of every rank are gathered *with* their gradients, so each view's negatives are
all other views of the global batch and each rank's loss backpropagates into every rank's encoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.infonce import InfoNCEImpl, info_nce, nt_xent_indices
from pretrain.activation_memory import STAT, Collective, global_bn_bytes
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.distributed import all_gather_cat_grad, rank
from pretrain.flops import FlopCount, linear_flops, mlp_flops
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
from pretrain.methods.joint_embedding import (
    joint_embedding_crop_views,
    joint_embedding_device_transform,
    joint_embedding_transform,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.heads import init_moco_mlp, moco_mlp
from pretrain.visualize import denormalize, match_grid


@dataclass
class SimCLRConfig:
    """method.simclr: the paper's ImageNet defaults (2048-wide hidden layer for ResNet-50, 128-d output)."""

    # The projection head: Linear -> BN -> ReLU -> Linear (-> BN), 2 layers (paper section 2.1, B.1).
    proj_hidden_dim: int = bounded(2048, gt=0)
    proj_dim: int = bounded(128, gt=0)
    # End the head in a BatchNorm without affine parameters; the released TF code normalizes the output
    # layer too (no bias, no centering). It holds no weights.
    proj_last_bn: bool = True
    # tau of NT-Xent.
    temperature: float = bounded(0.1, gt=0)
    # The encoder's pooled feature the head reads: a ResNet's is its global average ("mean"); a ViT's
    # may be its cls token.
    pool: FeaturePool = "mean"
    # auto: the fused/tiled kernel for the device | reference: the plain formula (kernels/infonce).
    infonce_impl: InfoNCEImpl = "auto"


def nt_xent_loss(embeddings: Tensor, temperature: float, impl: str = "auto") -> Tensor:
    """NT-Xent of this rank's 2n embeddings [view 1 of its n images; view 2 of them] against those of every
    rank, gathered with gradients: each row's positive is its partner view, its own row is excluded, the
    other 2N - 2 rows of the global batch are negatives. The mean over this rank's rows; averaging over
    ranks (as data-parallel gradients are) gives the global batch's loss."""
    keys = all_gather_cat_grad(embeddings)
    positives, exclude = nt_xent_indices(embeddings.shape[0], rank(), embeddings.device)
    return info_nce(embeddings, keys, temperature, positives, normalize=True, impl=impl, exclude=exclude)


class SimCLR(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        proj_hidden_dim: int = 2048,
        proj_dim: int = 128,
        proj_last_bn: bool = True,
        temperature: float = 0.1,
        pool: str = "mean",
        infonce_impl: InfoNCEImpl = "auto",
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.temperature, self.pool, self.infonce_impl = temperature, pool, infonce_impl
        self.image_mean, self.image_std = image_mean, image_std
        self.backbone = backbone
        self.projector = moco_mlp(2, width, proj_hidden_dim, proj_dim, last_bn=proj_last_bn)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        init_moco_mlp(self.projector)

    def embed(self, images: Tensor) -> Tensor:
        return self.projector(self.backbone.forward_features(images, pool=self.pool))

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            raise ValueError("SimCLR needs batch['image'] as a list of 2 views (the simclr train transform)")
        embeddings = self.embed(torch.cat(list(views)))
        return {"loss": nt_xent_loss(embeddings, self.temperature, self.infonce_impl)}

    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Top row: first views of a few images; bottom row: the view among this batch's other 2n - 1 that
        each first view is most similar to, framed green where it is the partner view and red otherwise."""
        first, second = batch["image"]
        n = first.shape[0]
        z = F.normalize(self.embed(torch.cat([first, second])).float(), dim=1)
        similarity = (z[:n] @ z.T).index_fill_(1, torch.arange(n, device=z.device), -2.0)
        similarity[torch.arange(n), torch.arange(n)] = -2.0
        nearest = similarity.argmax(dim=1)[: self.num_visuals]
        images = torch.cat([first, second]).float()
        shown = denormalize(images[: len(nearest)], self.image_mean, self.image_std)
        found = denormalize(images[nearest], self.image_mean, self.image_std)
        right = nearest == torch.arange(len(nearest), device=nearest.device) + n
        return {"views_and_nearest": match_grid(shown, found, right)}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    validate_pool(cfg, cfg.method.simclr.pool, "method.simclr.pool")
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: SimCLR uses exactly two views, got {cfg.data.local_crops}; set 0")


def build(cfg: Config) -> SimCLR:
    simclr = cfg.method.simclr
    return SimCLR(
        build_backbone(cfg),
        backbone_width(cfg),
        proj_hidden_dim=simclr.proj_hidden_dim,
        proj_dim=simclr.proj_dim,
        proj_last_bn=simclr.proj_last_bn,
        temperature=simclr.temperature,
        pool=simclr.pool,
        infonce_impl=simclr.infonce_impl,
        image_mean=cfg.data.mean,
        image_std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """Two views through the encoder and the 2-layer head, and each view's logits against this process's
    2 x data.batch_size views (at world size W, W x as many)."""
    simclr = cfg.method.simclr
    head = mlp_flops([backbone_width(cfg), simclr.proj_hidden_dim, simclr.proj_dim])
    logits = linear_flops(1, simclr.proj_dim, 2 * cfg.data.batch_size)
    view = backbone_flops(cfg, cfg.data.image_size) + FlopCount(head + logits)
    return FlopCount(2 * view.trained, 2 * view.frozen)


def collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """The embeddings all-gathered (forward) and their gradients summed back (backward: all-to-all on gloo,
    reduce-scatter on NCCL), and the head's BN moments all-reduced forward and backward. The ResNet's own
    BN moments (one all-reduce per BN layer) are the engine's, not counted here."""
    simclr = cfg.method.simclr
    bn = lambda d: (2 * d + 1) * STAT  # noqa: E731
    head_bns = [simclr.proj_hidden_dim] + ([simclr.proj_dim] if simclr.proj_last_bn else [])
    embeddings = 2 * micro_batch * simclr.proj_dim * act
    return [
        Collective("SimCLR embeddings", "all_gather", embeddings, 1),
        Collective("SimCLR embedding gradients", "reduce_scatter", embeddings, 1),
        Collective("BN moments, projection head (forward + backward)", "all_reduce", sum(map(bn, head_bns)), 2),
    ]


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample (two views through one encoder): the encoder, the 2-layer head with its batch norms, and
    NT-Xent's saved rows."""
    simclr = cfg.method.simclr
    hidden, proj = simclr.proj_hidden_dim, simclr.proj_dim
    head = backbone_width(cfg) * act + hidden * act + global_bn_bytes(hidden) + hidden * act
    head += proj * act + (global_bn_bytes(proj) if simclr.proj_last_bn else 0)
    return {
        **encoder_activations(cfg, cfg.data.image_size, 2, act, checkpointing),
        "projection head": 2 * head,
        "NT-Xent (embeddings, keys, log-sum-exp)": 2 * 3 * proj * STAT,
    }


SPEC = MethodSpec(
    "simclr",
    SimCLRConfig,
    build,
    joint_embedding_transform,
    validate=validate,
    device_transform=joint_embedding_device_transform,
    flops=flops,
    activations=activations,
    collectives=collectives,
    crop_views=joint_embedding_crop_views,
)
