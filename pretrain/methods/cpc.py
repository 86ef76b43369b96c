"""CPC v2 (Henaff et al. 2019, "Data-Efficient Image Recognition with Contrastive Predictive Coding"): each image
becomes a grid of overlapping patches; the `model.*` encoder turns every patch into one vector z[i, j]; a masked
context network over the grid gives c[i, j], which sees only rows <= i; and a linear map per offset k predicts
z[i + k, j] from c[i, j], scored by InfoNCE against every other patch vector of the global batch (other positions
of the same image and all patches of the other images, gathered from every rank with their gradients).

The paper's appendix A.2 pseudocode fixes the prediction head: targets are a linear projection of z to
`target_dim`, each offset has its own linear map of c, logits are their dot products scaled by `emb_scale`, and
the per-offset cross-entropies are summed. Its context network is a PixelCNN-style stack of residual blocks
(1x1 conv, 1x3 conv within the row, a 2x1 conv over the row above and the row itself, 1x1 conv): no position
ever sees a lower row. Section 4.1's v2 changes are options: layer norm in the encoder
(`model.resnet_norm = "layer"`: batch statistics couple the patches of an image and let the loss cheat),
predictions in up to four directions (`directions`: the grid rotated by 180 degrees, then by 90 and 270,
each direction with its own context network and heads), and color dropping per patch (`color_drop`).

Offsets start at `first_offset`: with 50 % overlap, row i + 1 shares pixels with row i and row i + 2 touches
it, so the pseudocode ignores those two (steps_to_ignore = 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels.infonce import InfoNCEImpl, info_nce
from pretrain.config import Config, ConfigError, FeaturePool, bounded
from pretrain.distributed import all_gather_cat_grad, rank
from pretrain.flops import FlopCount, linear_flops
from pretrain.methods.backbone import (
    backbone_blocks,
    backbone_flops,
    backbone_no_weight_decay,
    backbone_width,
    build_backbone,
    validate_backbone,
    validate_backbone_input,
    validate_pool,
)
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.methods.tiles import assemble_tiles
from pretrain.visualize import denormalize, image_grid

DIRECTIONS = (1, 2, 4)
# Quarter turns of the grid per direction: top-down, bottom-up, then the two horizontal ones.
ROTATIONS = (0, 2, 1, 3)
EvalFeatures = Literal["patch_grid", "image"]


@dataclass
class CPCConfig:
    """method.cpc: the paper's ImageNet settings (see configs/cpc_v2_resnet50.toml for each source)."""

    # The grid cut from the center of each crop: grid x grid patches of patch_size px, patch_stride px apart
    # (CPC v1 section 3.3, kept by v2: a 7 x 7 grid of 64 px patches with 32 px overlap from a 256 px image).
    grid: int = bounded(7, gt=1)
    patch_size: int = bounded(64, gt=0)
    patch_stride: int = bounded(32, gt=0)
    # The context network: residual blocks and their bottleneck width (appendix A.2: 5 blocks of 256).
    context_blocks: int = bounded(5, ge=0)
    context_dim: int = bounded(256, gt=0)
    # Width the targets and predictions are projected to (appendix A.2: target_dim = 64).
    target_dim: int = bounded(64, gt=0)
    # Logits = emb_scale x prediction . target (appendix A.2: emb_scale = 0.1), i.e. InfoNCE at tau = 1 / emb_scale.
    emb_scale: float = bounded(0.1, gt=0)
    # Rows ahead that are predicted, first_offset..last_offset (appendix A.2: steps_to_ignore = 2, steps_to_predict
    # = 3: only 3 rows ahead).
    first_offset: int = bounded(3, gt=0)
    last_offset: int = bounded(3, gt=0)
    # 1: from above only (v1) | 2: also from below | 4: also from the left and the right (section 4.1).
    directions: int = bounded(4, gt=0)
    # Keep one random color channel of each patch and zero the other two (section 4.1, patch-based augmentation).
    color_drop: bool = True
    # What eval and export use: patch_grid, the encoder on the grid averaged over patches (the paper's linear
    # evaluation reads the encoder's patch features, mean-pooled) | image, the encoder on the whole image.
    eval_features: EvalFeatures = "patch_grid"
    # What each patch contributes (ViT: cls token or mean of its tokens; a ResNet has only "mean").
    pool: FeaturePool = "mean"
    # auto: the fused/tiled kernel for the device | reference: the plain formula (kernels/infonce).
    infonce_impl: InfoNCEImpl = "auto"


def grid_span(grid: int, patch: int, stride: int) -> int:
    return (grid - 1) * stride + patch


def cut_patch_grid(images: Tensor, grid: int, patch: int, stride: int) -> Tensor:
    """[B, C, H, W] -> [B, grid, grid, C, patch, patch]: the grid centered in the image, row-major."""
    span = grid_span(grid, patch, stride)
    top, left = (images.shape[-2] - span) // 2, (images.shape[-1] - span) // 2
    crop = images[..., top : top + span, left : left + span]
    return crop.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


def drop_colors(patches: Tensor) -> Tensor:
    """Keep one random channel of each patch (torch's global generator, seeded per step by the loop) and zero
    the others: the normalized value of the dataset mean, so a dropped channel carries nothing."""
    *lead, channels, _, _ = patches.shape
    keep = torch.randint(channels, tuple(lead), device=patches.device)
    mask = F.one_hot(keep, channels).to(patches.dtype)
    return patches * mask[..., None, None]


class PatchGridEncoder(nn.Module):
    """The encoder applied to every patch of the grid; `forward_features` averages the patches' pooled features
    (the network eval and export use with eval_features = "patch_grid")."""

    def __init__(self, backbone: nn.Module, grid: int, patch: int, stride: int, pool: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.grid, self.patch, self.stride, self.pool = grid, patch, stride, pool
        self.embed_dim = backbone.embed_dim

    def encode_patches(self, patches: Tensor, pool: str | None = None) -> Tensor:
        """[B, G, G, C, p, p] -> latents [B, D, G, G], one encoder pass per patch (patches never mix)."""
        batch, rows, cols = patches.shape[:3]
        z = self.backbone.forward_features(patches.flatten(0, 2), pool=pool or self.pool)
        return z.reshape(batch, rows, cols, -1).permute(0, 3, 1, 2)

    def forward_features(self, images: Tensor, pool: str | None = None) -> Tensor:
        patches = cut_patch_grid(images, self.grid, self.patch, self.stride)
        return self.encode_patches(patches, pool).mean(dim=(2, 3))

    def forward(self, images: Tensor) -> Tensor:
        return self.forward_features(images)


class MaskedResidualBlock(nn.Module):
    """Appendix A.2's block: 1x1 -> ReLU -> 1x3 within the row -> 2x1 over (row above, this row) -> ReLU -> 1x1,
    added to the input. The 2x1 conv is padded only above, so row i reads rows i - 1 and i, never below."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(dim, hidden, 1)
        self.along_row = nn.Conv2d(hidden, hidden, (1, 3), padding=(0, 1))
        self.from_above = nn.Conv2d(hidden, hidden, (2, 1))
        self.expand = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        c = self.along_row(F.relu(self.reduce(x)))
        c = self.from_above(F.pad(c, (0, 0, 1, 0)))
        return x + self.expand(F.relu(c))


class ContextNetwork(nn.Sequential):
    """The masked stack over the latent grid [B, D, G, G] -> context [B, D, G, G], ending in a ReLU (A.2)."""

    def __init__(self, dim: int, hidden: int, blocks: int) -> None:
        super().__init__(*[MaskedResidualBlock(dim, hidden) for _ in range(blocks)], nn.ReLU())


class DirectionalPredictor(nn.Module):
    """One prediction direction (the grid rotated so it runs top-down): its context network, the target
    projection and one linear prediction per offset (1x1 convs of the pseudocode, as Linear layers)."""

    def __init__(self, dim: int, hidden: int, blocks: int, target_dim: int, offsets: list[int]) -> None:
        super().__init__()
        self.offsets = offsets
        self.context = ContextNetwork(dim, hidden, blocks)
        self.targets = nn.Linear(dim, target_dim)
        self.predictors = nn.ModuleList(nn.Linear(dim, target_dim) for _ in offsets)

    def forward(self, latents: Tensor) -> tuple[list[Tensor], Tensor]:
        """latents [B, D, G, G] -> (per offset k: predictions [B, G - k, G, T] of rows k.., targets [B, G, G, T])."""
        context = self.context(latents).permute(0, 2, 3, 1)
        targets = self.targets(latents.permute(0, 2, 3, 1))
        grid = latents.shape[2]
        predictions = [head(context[:, : grid - k]) for k, head in zip(self.offsets, self.predictors)]
        return predictions, targets


def offset_positives(batch: int, grid: int, offset: int, first_key: int, device: torch.device) -> Tensor:
    """Key index of query (b, i, j)'s target z[b, i + offset, j] among the gathered [W x B x G x G] targets."""
    b = torch.arange(batch, device=device)[:, None, None]
    i = torch.arange(grid - offset, device=device)[None, :, None]
    j = torch.arange(grid, device=device)[None, None, :]
    return (first_key + (b * grid + i + offset) * grid + j).flatten()


def cpc_losses(
    predictions: list[Tensor], targets: Tensor, offsets: list[int], emb_scale: float, impl: str = "auto"
) -> list[Tensor]:
    """One InfoNCE per offset: each prediction against every target of the global batch (gathered with gradients,
    so the other images of every rank are negatives), its own target z[b, i + k, j] the positive. Each is the
    mean over this rank's queries."""
    batch, grid = targets.shape[:2]
    keys = all_gather_cat_grad(targets.flatten(0, 2))
    first_key = rank() * batch * grid * grid
    losses = []
    for k, queries in zip(offsets, predictions):
        positives = offset_positives(batch, grid, k, first_key, targets.device)
        losses.append(info_nce(queries.flatten(0, 2), keys, 1.0 / emb_scale, positives, normalize=False, impl=impl))
    return losses


@torch.no_grad()
def offset_accuracies(predictions: list[Tensor], targets: Tensor, offsets: list[int]) -> list[float]:
    """Per offset: the fraction of this batch's queries whose highest logit is their own target."""
    batch, grid = targets.shape[:2]
    keys = targets.flatten(0, 2).float()
    accuracies = []
    for k, queries in zip(offsets, predictions):
        best = (queries.flatten(0, 2).float() @ keys.T).argmax(dim=1)
        accuracies.append(float((best == offset_positives(batch, grid, k, 0, targets.device)).float().mean()))
    return accuracies


def bar_chart(values: list[list[float]], height: int = 96, bar: int = 12, gap: int = 4) -> Tensor:
    """uint8 [H, W, 3]: one group of bars per direction (one bar per offset, values in 0..1), white on dark gray,
    a mid-gray line at each 10 %."""
    groups, per_group = len(values), len(values[0])
    width = gap + groups * (per_group * (bar + 1) + gap)
    picture = torch.full((height + 2 * gap, width, 3), 40, dtype=torch.uint8)
    for level in range(1, 10):
        picture[gap + height - level * height // 10, :, :] = 90
    for g, group in enumerate(values):
        for o, value in enumerate(group):
            left = gap + g * (per_group * (bar + 1) + gap) + o * (bar + 1)
            top = gap + height - round(max(0.0, min(1.0, value)) * height)
            picture[top : gap + height, left : left + bar] = 235
    return picture


class CPC(Method):
    num_visuals = 4

    def __init__(
        self,
        backbone: nn.Module,
        width: int,
        grid: int = 7,
        patch_size: int = 64,
        patch_stride: int = 32,
        context_blocks: int = 5,
        context_dim: int = 256,
        target_dim: int = 64,
        emb_scale: float = 0.1,
        offsets: tuple[int, ...] = (3,),
        directions: int = 4,
        color_drop: bool = True,
        eval_features: str = "patch_grid",
        pool: str = "mean",
        infonce_impl: InfoNCEImpl = "auto",
        image_mean: tuple[float, ...] = (0.5, 0.5, 0.5),
        image_std: tuple[float, ...] = (0.5, 0.5, 0.5),
    ) -> None:
        super().__init__()
        self.offsets = list(offsets)
        self.emb_scale, self.color_drop, self.eval_features = emb_scale, color_drop, eval_features
        self.infonce_impl, self.image_mean, self.image_std = infonce_impl, image_mean, image_std
        self.encoder = PatchGridEncoder(backbone, grid, patch_size, patch_stride, pool)
        self.rotations = ROTATIONS[:directions]
        self.predictors = nn.ModuleList(
            DirectionalPredictor(width, context_dim, context_blocks, target_dim, self.offsets) for _ in self.rotations
        )
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.encoder.backbone.init_weights()
        for predictor in self.predictors:
            for module in predictor.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    module.reset_parameters()

    def patches(self, images: Tensor) -> Tensor:
        e = self.encoder
        patches = cut_patch_grid(images, e.grid, e.patch, e.stride)
        return drop_colors(patches) if self.color_drop and self.training else patches

    def predict(self, latents: Tensor) -> list[tuple[list[Tensor], Tensor]]:
        """Per direction: the latent grid turned so the direction runs top-down, and its predictions and targets."""
        return [p(torch.rot90(latents, r, dims=(2, 3))) for r, p in zip(self.rotations, self.predictors)]

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        latents = self.encoder.encode_patches(self.patches(batch["image"]))
        out, total = {}, 0.0
        for r, (predictions, targets) in zip(self.rotations, self.predict(latents)):
            for k, loss in zip(
                self.offsets, cpc_losses(predictions, targets, self.offsets, self.emb_scale, self.infonce_impl)
            ):
                total = total + loss
                out[f"cpc_loss_rot{90 * r}_k{k}"] = loss.detach()
        return {"loss": total, **out}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """The patch grid of a few images (overlapping patches laid out apart), and the prediction accuracy per
        offset among this batch's targets: one group of bars per direction (top-down, bottom-up, left, right)."""
        images = batch["image"]
        patches = self.patches(images)
        shown = patches[: self.num_visuals].float()
        grid = shown.shape[1]
        flat = denormalize(shown.flatten(0, 2), self.image_mean, self.image_std).expand(-1, 3, -1, -1)
        tiles = flat.reshape(shown.shape[0], grid * grid, *flat.shape[1:])
        picture = image_grid(assemble_tiles(tiles, grid, gap=2), nrow=self.num_visuals)
        latents = self.encoder.encode_patches(patches)
        accuracy = [offset_accuracies(p, t, self.offsets) for p, t in self.predict(latents)]
        return {"patch_grid": picture, "prediction_accuracy_per_offset": bar_chart(accuracy)}

    def inference_network(self) -> nn.Module:
        return self.encoder if self.eval_features == "patch_grid" else self.encoder.backbone

    def transformer_blocks(self) -> list:
        return backbone_blocks(self.encoder.backbone)

    def no_weight_decay(self) -> set[str]:
        return backbone_no_weight_decay(self.encoder.backbone, prefix="encoder.backbone")


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    cpc = cfg.method.cpc
    validate_pool(cfg, cpc.pool, "method.cpc.pool")
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: CPC uses one crop per image, got {cfg.data.local_crops}; set 0")
    if cpc.directions not in DIRECTIONS:
        raise ConfigError(f"method.cpc.directions: one of {DIRECTIONS}, got {cpc.directions}")
    if cpc.patch_stride > cpc.patch_size:
        raise ConfigError(
            f"method.cpc.patch_stride: {cpc.patch_stride} px is more than method.cpc.patch_size {cpc.patch_size}: "
            "the grid's patches would leave pixels out (CPC's patches overlap or touch)"
        )
    span = grid_span(cpc.grid, cpc.patch_size, cpc.patch_stride)
    if span > cfg.data.image_size:
        raise ConfigError(
            f"method.cpc.grid: a {cpc.grid}x{cpc.grid} grid of {cpc.patch_size} px patches with method.cpc.patch_stride "
            f"{cpc.patch_stride} spans {span} px, more than data.image_size {cfg.data.image_size}"
        )
    validate_backbone_input(cfg, cpc.patch_size, "method.cpc.patch_size")
    if cpc.first_offset > cpc.last_offset:
        raise ConfigError(
            f"method.cpc.first_offset: {cpc.first_offset} is after method.cpc.last_offset {cpc.last_offset}"
        )
    if cpc.last_offset >= cpc.grid:
        raise ConfigError(
            f"method.cpc.last_offset: {cpc.last_offset} rows ahead leaves no context row in a grid of {cpc.grid} rows"
        )
    if cpc.color_drop and cfg.model.in_chans < 2:
        raise ConfigError(f"method.cpc.color_drop: needs color channels, model.in_chans is {cfg.model.in_chans}")


def build(cfg: Config) -> CPC:
    cpc = cfg.method.cpc
    return CPC(
        build_backbone(cfg),
        backbone_width(cfg),
        grid=cpc.grid,
        patch_size=cpc.patch_size,
        patch_stride=cpc.patch_stride,
        context_blocks=cpc.context_blocks,
        context_dim=cpc.context_dim,
        target_dim=cpc.target_dim,
        emb_scale=cpc.emb_scale,
        offsets=tuple(range(cpc.first_offset, cpc.last_offset + 1)),
        directions=cpc.directions,
        color_drop=cpc.color_drop,
        eval_features=cpc.eval_features,
        pool=cpc.pool,
        infonce_impl=cpc.infonce_impl,
        image_mean=cfg.data.mean,
        image_std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """The encoder on every patch; per direction the context network, the target projection and each offset's
    prediction on the grid, and each offset's logits against this process's B x G x G targets."""
    cpc, grid = cfg.method.cpc, cfg.method.cpc.grid
    width, hidden, cells = backbone_width(cfg), cpc.context_dim, cpc.grid**2
    block = linear_flops(cells, width, hidden) + linear_flops(cells, 3 * hidden, hidden)
    block += linear_flops(cells, 2 * hidden, hidden) + linear_flops(cells, hidden, width)
    offsets = range(cpc.first_offset, cpc.last_offset + 1)
    heads = linear_flops(cells, width, cpc.target_dim) + sum(
        linear_flops((grid - k) * grid, width, cpc.target_dim) for k in offsets
    )
    logits = sum(linear_flops((grid - k) * grid, cpc.target_dim, cfg.data.batch_size * cells) for k in offsets)
    encoder = backbone_flops(cfg, cpc.patch_size)
    per_direction = cpc.context_blocks * block + heads + logits
    return FlopCount(cells * encoder.trained + cpc.directions * per_direction, cells * encoder.frozen)


# One random resized crop (and flip) per image; the grid and its color dropping are cut in `forward`.
SPEC = MethodSpec(
    "cpc",
    CPCConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    crop_views=single_crop_views,
)
