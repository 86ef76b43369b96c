"""MoCo v3 (Chen, Xie, He 2021): a query encoder with projector and predictor learns to match a momentum
encoder's projection of another view of the same image, against the other images of the global batch."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels.infonce import InfoNCEImpl, info_nce
from pretrain.activation_memory import STAT, Collective, blocks_bytes, global_bn_bytes, layer_norm_bytes, vit_block
from pretrain.config import Config, ConfigError, bounded
from pretrain.distributed import all_gather_cat, rank
from pretrain.flops import FlopCount, linear_flops, mlp_flops
from pretrain.methods.backbone import build_vit_backbone, validate_vit_backbone, vit_backbone_flops, vit_width
from pretrain.methods.base import Method
from pretrain.methods.joint_embedding import (
    joint_embedding_crop_views,
    joint_embedding_device_transform,
    joint_embedding_transform,
)
from pretrain.methods.spec import MethodSpec
from pretrain.models.heads import init_moco_mlp, moco_mlp
from pretrain.models.vit import VIT_SIZES, VisionTransformer
from pretrain.optim import cosine_ramp


@dataclass
class MoCoConfig:
    """method.moco: MoCo v3's defaults (ViT: 256-d output, 4096-wide MLPs, T = 0.2, momentum 0.99)."""

    proj_dim: int = bounded(256, gt=0)
    mlp_dim: int = bounded(4096, gt=0)
    temperature: float = bounded(0.2, gt=0)
    # Base EMA momentum of the key encoder, raised to 1 on a cosine over training.
    momentum: float = bounded(0.99, ge=0, le=1)
    # The paper's random, frozen patch projection (stabilizes ViT training).
    freeze_patch_embed: bool = True
    # auto: the fused/tiled kernel for the device | reference: the plain formula (kernels/infonce).
    infonce_impl: InfoNCEImpl = "auto"
    # End the 2-layer predictor in a BatchNorm without affine parameters, as the released MLP builder
    # does for both projector and predictor. It holds no weights: checkpoints load either way.
    predictor_last_bn: bool = True


def moco_contrastive_loss(query: Tensor, key: Tensor, temperature: float, impl: str = "auto") -> Tensor:
    """InfoNCE of this rank's queries against the keys of every rank, scaled by 2 * tau as in the paper.

    The positive of query i is this rank's key i, at position rank * N + i of the gathered keys.
    """
    keys = all_gather_cat(key.detach())
    offset = rank() * query.shape[0]
    positives = torch.arange(query.shape[0], device=query.device) + offset
    return info_nce(query, keys, temperature, positives=positives, normalize=True, impl=impl) * (2 * temperature)


class MoCoV3(Method):
    def __init__(
        self,
        backbone: VisionTransformer,
        proj_dim: int = 256,
        mlp_dim: int = 4096,
        temperature: float = 0.2,
        momentum: float = 0.99,
        freeze_patch_embed: bool = True,
        infonce_impl: InfoNCEImpl = "auto",
        predictor_last_bn: bool = True,
    ) -> None:
        super().__init__()
        self.temperature, self.base_momentum, self.infonce_impl = temperature, momentum, infonce_impl
        self.freeze_patch_embed = freeze_patch_embed
        self.backbone = backbone
        self.projector = moco_mlp(3, backbone.embed_dim, mlp_dim, proj_dim, last_bn=True)
        self.predictor = moco_mlp(2, proj_dim, mlp_dim, proj_dim, last_bn=predictor_last_bn)
        self.momentum_backbone = copy.deepcopy(backbone)
        self.momentum_projector = copy.deepcopy(self.projector)
        for param in [*self.momentum_backbone.parameters(), *self.momentum_projector.parameters()]:
            param.requires_grad_(False)
        if freeze_patch_embed:
            # A random, fixed patch projection: the paper's fix for the training instability of ViT.
            self.backbone.patch_embed.requires_grad_(False)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        init_moco_mlp(self.projector)
        init_moco_mlp(self.predictor)
        self.momentum_backbone.init_weights()  # refills its position buffer (needed after meta init)
        self.copy_online_to_averaged()

    def inference_network(self) -> VisionTransformer:
        return self.backbone

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [self.backbone.blocks, self.momentum_backbone.blocks]

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()}

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        return [(self.momentum_backbone, self.backbone), (self.momentum_projector, self.projector)]

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """Cosine from the base momentum to 1 over training."""
        return cosine_ramp(step, total_steps, self.base_momentum, 1.0)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        views = batch["image"]
        if not isinstance(views, (list, tuple)) or len(views) != 2:
            raise ValueError("MoCo v3 needs batch['image'] as a list of 2 views (the moco train transform)")
        # One backbone pass over both views; heads per view, so batch-norm statistics stay per view as in the paper.
        both = torch.cat(list(views))
        q1, q2 = (self.predictor(self.projector(f)) for f in self.backbone.forward_features(both, "cls").chunk(2))
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(f) for f in self.momentum_backbone.forward_features(both, "cls").chunk(2))
        loss = moco_contrastive_loss(q1, k2, self.temperature, self.infonce_impl) + moco_contrastive_loss(
            q2, k1, self.temperature, self.infonce_impl
        )
        return {"loss": loss}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_vit_backbone(cfg)
    if cfg.data.local_crops:
        raise ConfigError(
            f"data.local_crops: MoCo v3 uses exactly two views, got {cfg.data.local_crops} local crops; set 0"
        )


def build(cfg: Config) -> MoCoV3:
    moco = cfg.method.moco
    return MoCoV3(
        build_vit_backbone(cfg),
        proj_dim=moco.proj_dim,
        mlp_dim=moco.mlp_dim,
        temperature=moco.temperature,
        momentum=moco.momentum,
        freeze_patch_embed=moco.freeze_patch_embed,
        infonce_impl=moco.infonce_impl,
        predictor_last_bn=moco.predictor_last_bn,
    )


def flops(cfg: Config) -> FlopCount:
    """Two views through the query branch (backbone, 3-layer projector, 2-layer predictor) and, forward only,
    the momentum branch (backbone, projector); plus the InfoNCE logits of both query views against this
    process's data.batch_size keys (at world size W the keys are W x as many: under 0.1% of the total)."""
    moco, dim = cfg.method.moco, vit_width(cfg)
    backbone = vit_backbone_flops(cfg, cfg.data.image_size, frozen_embed=moco.freeze_patch_embed)
    projector = mlp_flops([dim, moco.mlp_dim, moco.mlp_dim, moco.proj_dim])
    predictor = mlp_flops([moco.proj_dim, moco.mlp_dim, moco.proj_dim])
    logits = linear_flops(1, moco.proj_dim, cfg.data.batch_size)
    query = backbone + FlopCount(projector + predictor + logits)
    momentum = (vit_backbone_flops(cfg, cfg.data.image_size) + FlopCount(projector)).as_frozen()
    views = 2
    return FlopCount(views * query.trained, views * (query.frozen + momentum.frozen))


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample (two views): the query backbone and heads; the momentum branch runs without grad."""
    moco, data, model = cfg.method.moco, cfg.data, cfg.model
    dim, depth, heads = VIT_SIZES[cfg.model.size]
    tokens = (data.image_size // model.patch_size) ** 2 + 1
    mlp, proj = moco.mlp_dim, moco.proj_dim
    projector = dim * act + 2 * (mlp * act + global_bn_bytes(mlp) + mlp * act) + mlp * act + global_bn_bytes(proj)
    predictor = proj * act + global_bn_bytes(mlp) + 2 * mlp * act
    return {
        "backbone blocks": 2
        * blocks_bytes(vit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": 0 if moco.freeze_patch_embed else 2 * model.in_chans * data.image_size**2 * act,
        "final norm": 2 * layer_norm_bytes(tokens, dim, act),
        "projector and predictor": 2 * (projector + predictor),
        "InfoNCE (queries, keys, log-sum-exp)": 2 * 3 * proj * STAT,
    }


def collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """Each rank's keys all-gathered (both views), and the heads' batch-norm moments all-reduced (forward,
    and backward for the trained heads)."""
    moco = cfg.method.moco
    # moments of one BN layer: sum, sum of squares (dim each) and the count, fp32
    bn = lambda d: (2 * d + 1) * STAT  # noqa: E731
    query_bns = [moco.mlp_dim, moco.mlp_dim, moco.proj_dim, moco.mlp_dim]  # projector (3), predictor (1)
    momentum_bns = [moco.mlp_dim, moco.mlp_dim, moco.proj_dim]
    return [
        Collective("MoCo keys", "all_gather", micro_batch * moco.proj_dim * act, 2),
        Collective("BN moments, query heads (forward + backward)", "all_reduce", sum(map(bn, query_bns)), 2 * 2),
        Collective("BN moments, momentum heads", "all_reduce", sum(map(bn, momentum_bns)), 2),
    ]


SPEC = MethodSpec(
    "moco",
    MoCoConfig,
    build,
    joint_embedding_transform,
    validate=validate,
    device_transform=joint_embedding_device_transform,
    flops=flops,
    activations=activations,
    collectives=collectives,
    averaged_network_runs_forward=True,
    crop_views=joint_embedding_crop_views,
)
