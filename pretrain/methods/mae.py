"""Masked autoencoder pretraining (He et al., 2021): encode a random 25% of patches, reconstruct the rest."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.activation_memory import INDEX, STAT, blocks_bytes, layer_norm_bytes, vit_block
from pretrain.config import Config, ConfigError, bounded
from pretrain.flops import FlopCount, block_flops, linear_flops
from pretrain.methods.backbone import build_vit_backbone, validate_vit_backbone, vit_backbone_flops, vit_width
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.transformer import Block, init_linear_and_norm
from pretrain.models.vit import VIT_SIZES, VisionTransformer, patchify, unpatchify
from pretrain.visualize import denormalize, image_grid


@dataclass
class MAEConfig:
    """method.mae: the paper's defaults (ViT-B/16: 75% masking, an 8-block 512-wide decoder, normalized pixels)."""

    mask_ratio: float = bounded(0.75, gt=0, lt=1)
    decoder_dim: int = bounded(512, gt=0)
    decoder_depth: int = bounded(8, gt=0)
    decoder_heads: int = bounded(16, gt=0)
    norm_pix_loss: bool = True


class PatchMasking(NamedTuple):
    """One random masking of L patches per sample; shuffle order = ascending noise."""

    keep_indices: Tensor  # [B, K] patch indices the encoder sees
    restore_indices: Tensor  # [B, L] position of each patch in the shuffled order
    mask: Tensor  # [B, L] float, 1 where the patch is hidden


def random_masking(
    batch_size: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> PatchMasking:
    """Per-sample uniform masking by argsort of noise, keeping int(L * (1 - ratio)) patches as in MAE.

    Without a generator the noise comes from the global RNG, so a checkpointed RNG state replays it.
    """
    num_keep = int(num_patches * (1 - mask_ratio))
    noise = torch.rand(batch_size, num_patches, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    return PatchMasking(shuffle[:, :num_keep], restore, (restore >= num_keep).float())


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool, eps: float = 1e-6) -> Tensor:
    """Mean over hidden patches of the per-patch pixel MSE (float32), on [B, L, P] predictions/targets.

    With `norm_pix` each target patch is standardized by its own mean and (unbiased) variance,
    which the MAE paper found gives better representations.
    """
    target = target.float()
    if norm_pix:
        target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + eps).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


class MaskedAutoencoder(Method):
    """ViT encoder on visible patches, a light transformer decoder predicting the pixels of the hidden ones."""

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        mlp_ratio: float = 4.0,
        attn_backend: str = "sdpa",
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        num_visuals: int = 8,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.backbone = encoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.image_mean = tuple(mean)  # the input normalization, undone for pictures
        self.image_std = tuple(std)
        self.num_visuals = num_visuals
        patch_dim = encoder.patch_size**2 * encoder.in_chans

        self.decoder_embed = nn.Linear(encoder.embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.empty(1, 1, decoder_dim))
        self.register_buffer(
            "decoder_pos_embed", torch.empty(1, encoder.num_patches + 1, decoder_dim), persistent=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_dim, decoder_heads, mlp_ratio, attn_backend=attn_backend) for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, patch_dim)
        self.init_decoder_weights()

    @torch.no_grad()
    def init_decoder_weights(self) -> None:
        """Initialize the decoder only, so an encoder passed in with trained weights keeps them."""
        grid = self.backbone.grid_size
        self.decoder_pos_embed.copy_(
            sincos_pos_embed_2d(grid, grid, self.decoder_pos_embed.shape[-1], cls_token=True).unsqueeze(0)
        )
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(init_linear_and_norm)
        nn.init.normal_(self.mask_token, std=0.02)

    def init_weights(self) -> None:
        """Initialize everything, e.g. after building on the meta device and `to_empty`."""
        self.backbone.init_weights()
        self.init_decoder_weights()

    def inference_network(self) -> VisionTransformer:
        return self.backbone

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [self.backbone.blocks, self.decoder_blocks]

    def no_weight_decay(self) -> set[str]:
        return {f"backbone.{name}" for name in self.backbone.no_weight_decay()} | {"mask_token"}

    def predict(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Predicted patches [B, L, p*p*C] for a fresh random masking, and that mask [B, L] (1 = hidden)."""
        batch = images.shape[0]
        masking = random_masking(batch, self.backbone.num_patches, self.mask_ratio, images.device, generator)
        latent = self.decoder_embed(self.backbone.forward_tokens(images, masking.keep_indices))

        num_hidden = self.backbone.num_patches - masking.keep_indices.shape[1]
        shuffled = torch.cat([latent[:, 1:], self.mask_token.expand(batch, num_hidden, -1).to(latent.dtype)], dim=1)
        index = masking.restore_indices.unsqueeze(-1).expand(-1, -1, latent.shape[-1])
        x = torch.cat([latent[:, :1], shuffled.gather(1, index)], dim=1) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x)[:, 1:]), masking.mask

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        images = batch["image"]
        pred, mask = self.predict(images)
        target = patchify(images, self.backbone.patch_size)
        return {"loss": masked_patch_loss(pred, target, mask, self.norm_pix_loss)}

    @torch.no_grad()
    def reconstruct(self, images: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Predicted images [B, C, H, W] in the input's normalization, and the pixel mask [B, 1, H, W] (1 = hidden).

        With norm_pix_loss the model predicts standardized patches; they are mapped back with each
        patch's true mean and std, which the model never saw: the picture shows predicted structure,
        not predicted brightness.
        """
        patch_size, channels = self.backbone.patch_size, self.backbone.in_chans
        pred, mask = self.predict(images, generator)
        pred = pred.float()
        if self.norm_pix_loss:
            target = patchify(images, patch_size).float()
            std = (target.var(dim=-1, keepdim=True) + 1e-6).sqrt()
            pred = pred * std + target.mean(dim=-1, keepdim=True)
        pixel_mask = mask.unsqueeze(-1).expand(-1, -1, patch_size * patch_size)
        return unpatchify(pred, patch_size, channels), unpatchify(pixel_mask, patch_size, 1)

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows: original, visible patches only, reconstruction with the visible patches pasted back.

        Uses a fixed-seed generator: the same masks at every call, so pictures compare across steps,
        and logging them does not consume the training RNG stream.
        """
        images = batch["image"][: self.num_visuals]
        generator = torch.Generator(device=images.device).manual_seed(0)
        pred, mask = self.reconstruct(images, generator)
        original = denormalize(images, self.image_mean, self.image_std)
        masked = original * (1 - mask)
        pasted = denormalize(pred * mask + images * (1 - mask), self.image_mean, self.image_std)
        rows = torch.cat([original, masked, pasted], dim=0)
        return {"reconstruction": image_grid(rows, nrow=images.shape[0])}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    validate_vit_backbone(cfg)
    if cfg.model.num_register_tokens:
        raise ConfigError(
            "model.num_register_tokens: MAE's decoder takes the cls token and the patches only; use 0 registers"
        )
    mae = cfg.method.mae
    if mae.decoder_dim % mae.decoder_heads:
        raise ConfigError(
            f"method.mae.decoder_dim: {mae.decoder_dim} is not divisible by method.mae.decoder_heads {mae.decoder_heads}"
        )


def build(cfg: Config) -> MaskedAutoencoder:
    mae = cfg.method.mae
    return MaskedAutoencoder(
        build_vit_backbone(cfg),
        decoder_dim=mae.decoder_dim,
        decoder_depth=mae.decoder_depth,
        decoder_heads=mae.decoder_heads,
        mask_ratio=mae.mask_ratio,
        norm_pix_loss=mae.norm_pix_loss,
        attn_backend=cfg.model.attn_backend,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def flops(cfg: Config) -> FlopCount:
    """Encoder on the visible patches (+ cls), decoder embedding, decoder blocks on all patches + cls, prediction."""
    mae, dim = cfg.method.mae, vit_width(cfg)
    patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
    kept = int(patches * (1 - mae.mask_ratio))
    patch_dim = cfg.model.patch_size**2 * cfg.model.in_chans
    decoder = (
        linear_flops(kept + 1, dim, mae.decoder_dim)
        + mae.decoder_depth * block_flops(patches + 1, mae.decoder_dim)
        + linear_flops(patches, mae.decoder_dim, patch_dim)
    )
    return vit_backbone_flops(cfg, cfg.data.image_size, kept_patches=kept) + FlopCount(decoder)


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: encoder on the visible patches + cls, decoder on all patches + cls, pixel loss."""
    mae, data, model = cfg.method.mae, cfg.data, cfg.model
    dim, depth, heads = VIT_SIZES[cfg.model.size]
    patches = (data.image_size // model.patch_size) ** 2
    kept = int(patches * (1 - mae.mask_ratio))
    patch_dim = model.patch_size**2 * model.in_chans
    enc_t, dec_t, dd = kept + 1, patches + 1, mae.decoder_dim
    return {
        "encoder blocks": blocks_bytes(vit_block(enc_t, dim, heads, act), enc_t * dim * act, depth, checkpointing),
        "decoder blocks": blocks_bytes(
            vit_block(dec_t, dd, mae.decoder_heads, act), dec_t * dd * act, mae.decoder_depth, checkpointing
        ),
        "patch embedding input": model.in_chans * data.image_size**2 * act,
        # each final norm's input and statistics, and its output (the next linear's input)
        "norms, decoder embedding and prediction inputs": layer_norm_bytes(enc_t, dim, act)
        + enc_t * dim * act
        + layer_norm_bytes(dec_t, dd, act)
        + dec_t * dd * act,
        "masking indices": (kept + patches) * INDEX,
        "loss (pixel error, mask)": patches * patch_dim * STAT + patches * STAT,
    }


SPEC = MethodSpec(
    "mae",
    MAEConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
)
