"""Inpainting with Context Encoders (Pathak et al. 2016, "Context Encoders: Feature Learning by Inpainting"):
pixels are removed (a central square, or random blocks), the encoder sees the rest, and a decoder fills the
hole. The loss is an L2 reconstruction on the removed pixels plus an adversarial term from a discriminator on
the filled region, weighted 0.999 / 0.001 as in the paper.

How the GAN fits the one-optimizer loop (as `vae.py` trains its patch discriminator): one backward of

    rec_weight * L2(hole) + adv_weight * G_adv + D_loss

gives every network its own gradient. D_loss (the standard GAN loss, real = the original region, fake = the
fill) sees the fill *detached*, so it moves only the discriminator; G_adv (the non-saturating -log D(fill))
goes through the discriminator by `torch.func.functional_call` with detached parameters, so it moves only
the encoder and decoder.

The encoder is the `model.*` backbone on the masked image (removed pixels set to the data mean, 0 after
normalization, as the paper fills them with the mean). On a ViT the decoder maps each patch token to its
pixels (a linear layer or an MLP). On a ResNet (`model.arch = "resnet18" | "resnet50"`) the decoder is the
paper's kind: the last stage's feature map (1/8 of the input with the small stem, 1/32 with the ImageNet
one) through 4x4 stride-2 up-convolutions with BatchNorm and ReLU back to the input's size, and a 1x1
convolution to pixels (`pretrain/models/conv_decoder.py`). Both predict the whole image and the loss reads
the hole, for either mask. The paper's AlexNet encoder and its channel-wise fully connected bottleneck are
not here: the ResNet's receptive field already spans the small inputs this runs on. kNN and the linear probe
evaluate the encoder on whole images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD
from pretrain.activation_memory import STAT
from pretrain.config import Config, ConfigError, bounded
from pretrain.flops import FlopCount, linear_flops
from pretrain.methods.backbone import (
    EncoderHooks,
    backbone_flops,
    backbone_width,
    build_backbone,
    encoder_activations,
    resnet_stride,
    validate_backbone,
    vit_width,
)
from pretrain.methods.base import Method
from pretrain.methods.image_crops import single_crop_device_transform, single_crop_transform, single_crop_views
from pretrain.methods.spec import MethodSpec
from pretrain.methods.vae import PatchDiscriminator
from pretrain.models.conv_decoder import UpsamplingDecoder, upsampling_decoder_flops
from pretrain.models.resnet import ResNet
from pretrain.models.transformer import init_linear_and_norm
from pretrain.models.vit import VisionTransformer, unpatchify
from pretrain.visualize import denormalize, image_grid

MaskKind = Literal["center", "random_blocks"]


@dataclass
class InpaintingConfig:
    """method.inpainting"""

    # center: one centered square of mask_size px | random_blocks: `blocks` squares of block_size px at random.
    mask: MaskKind = "center"
    mask_size: int = bounded(64, gt=0)
    blocks: int = bounded(4, gt=0)
    block_size: int = bounded(32, gt=0)
    rec_weight: float = bounded(0.999, ge=0)
    adv_weight: float = bounded(0.001, ge=0)
    disc_channels: int = bounded(64, gt=0)
    disc_layers: int = bounded(3, gt=0)
    # ViT: the decoder on each patch token: 0 = one linear layer to its pixels, > 0 = an MLP of this hidden width.
    decoder_hidden_dim: int = bounded(0, ge=0)
    # ResNet: channels of the decoder's first up-convolution, halved at each further one (at least 32).
    conv_decoder_width: int = bounded(256, gt=0)


def center_mask(batch: int, size: int, region: int, device: torch.device | None = None) -> Tensor:
    """[B, 1, size, size] float, 1 on the centered region x region square (the removed pixels)."""
    mask = torch.zeros(batch, 1, size, size, device=device)
    start = (size - region) // 2
    mask[:, :, start : start + region, start : start + region] = 1
    return mask


def random_block_mask(
    batch: int,
    size: int,
    blocks: int,
    block: int,
    device: torch.device | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """[B, 1, size, size] float: the union of `blocks` block x block squares per image at uniform positions
    (they may overlap), drawn from `generator` or torch's global one (seeded per step by the loop)."""
    corners = torch.randint(0, size - block + 1, (batch, blocks, 2), device=device, generator=generator)
    span = torch.arange(size, device=device)
    rows = (span >= corners[..., 0, None]) & (span < corners[..., 0, None] + block)  # [B, n, size]
    cols = (span >= corners[..., 1, None]) & (span < corners[..., 1, None] + block)
    return (rows[..., :, None] & cols[..., None, :]).any(dim=1, keepdim=True).float()


def masked_l2(prediction: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the removed pixels only (every channel of each), 0 elsewhere."""
    squared = (prediction.float() - target.float()).pow(2) * mask
    return squared.sum() / (mask.sum() * prediction.shape[1]).clamp(min=1)


def gan_losses(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """The discriminator's standard GAN loss: -log D(real) - log(1 - D(fake)), D = sigmoid(logits)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def token_decoder(width: int, hidden_dim: int, pixels: int) -> nn.Module:
    if hidden_dim == 0:
        return nn.Linear(width, pixels)
    return nn.Sequential(nn.Linear(width, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, pixels))


def pixel_decoder(backbone: VisionTransformer | ResNet, hidden_dim: int, conv_width: int) -> nn.Module:
    """Per token to its patch's pixels (ViT), or up-convolutions from the feature map (ResNet)."""
    channels = backbone.in_chans
    if isinstance(backbone, ResNet):
        stages = backbone.stride.bit_length() - 1
        return UpsamplingDecoder(backbone.embed_dim, channels, stages, conv_width)
    return token_decoder(backbone.embed_dim, hidden_dim, backbone.patch_size**2 * channels)


class ContextEncoder(EncoderHooks, Method):
    num_visuals = 8

    def __init__(
        self,
        backbone: VisionTransformer | ResNet,
        mask: str = "center",
        mask_size: int = 64,
        blocks: int = 4,
        block_size: int = 32,
        rec_weight: float = 0.999,
        adv_weight: float = 0.001,
        disc_channels: int = 64,
        disc_layers: int = 3,
        decoder_hidden_dim: int = 0,
        conv_decoder_width: int = 256,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = pixel_decoder(backbone, decoder_hidden_dim, conv_decoder_width)
        self.discriminator = PatchDiscriminator(backbone.in_chans, disc_channels, disc_layers)
        self.mask_kind, self.mask_size, self.blocks, self.block_size = mask, mask_size, blocks, block_size
        self.rec_weight, self.adv_weight = rec_weight, adv_weight
        self.image_mean, self.image_std = mean, std
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.backbone.init_weights()
        if isinstance(self.decoder, UpsamplingDecoder):
            self.decoder.init_weights()
        else:
            self.decoder.apply(init_linear_and_norm)
        for module in self.discriminator.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def draw_mask(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        batch, size = images.shape[0], images.shape[-1]
        if self.mask_kind == "center":
            return center_mask(batch, size, self.mask_size, images.device)
        return random_block_mask(batch, size, self.blocks, self.block_size, images.device, generator)

    def predict(self, images: Tensor, mask: Tensor) -> Tensor:
        """Pixels [B, C, H, W] predicted from the image with the masked pixels set to the mean (0)."""
        if isinstance(self.backbone, ResNet):
            return self.decoder(self.backbone.forward_feature_map(images * (1 - mask)))
        tokens = self.backbone.patch_tokens(self.backbone.forward_tokens(images * (1 - mask)))
        return unpatchify(self.decoder(tokens), self.backbone.patch_size, images.shape[1])

    def judged_region(self, images: Tensor) -> Tensor:
        """What the discriminator sees: the central square for the center mask (the fill alone, as in the
        paper), the whole image otherwise (the blocks' fills in their context)."""
        if self.mask_kind != "center":
            return images
        start = (images.shape[-1] - self.mask_size) // 2
        return images[..., start : start + self.mask_size, start : start + self.mask_size]

    def losses(self, images: Tensor) -> dict[str, Tensor]:
        """The three terms: rec (L2 on the hole), gen_adv (moves only encoder + decoder), disc (moves only D)."""
        mask = self.draw_mask(images)
        prediction = self.predict(images, mask)
        filled = images * (1 - mask) + prediction * mask
        real, fake = self.judged_region(images), self.judged_region(filled)
        disc = gan_losses(self.discriminator(real), self.discriminator(fake.detach()))
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        gen_adv = F.softplus(-functional_call(self.discriminator, frozen, (fake,))).mean()
        return {"rec": masked_l2(prediction, images, mask), "gen_adv": gen_adv, "disc": disc}

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        terms = self.losses(batch["image"])
        loss = self.rec_weight * terms["rec"] + self.adv_weight * terms["gen_adv"] + terms["disc"]
        return {"loss": loss, **{f"{name}_loss": value.detach() for name, value in terms.items()}}

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rows: the masked input (the hole at the mean color), the input with the hole filled, the original.
        Fixed-seed masks, so pictures compare across steps."""
        images = batch["image"][: self.num_visuals]
        mask = self.draw_mask(images, torch.Generator(device=images.device).manual_seed(0))
        filled = images * (1 - mask) + self.predict(images, mask) * mask
        rows = torch.cat([images * (1 - mask), filled, images]).float()
        return {"inpainting": image_grid(denormalize(rows, self.image_mean, self.image_std), nrow=len(images))}


# ---------------------------------------------------------------------- the method's spec


def judged_side(cfg: Config) -> int:
    inpainting = cfg.method.inpainting
    return inpainting.mask_size if inpainting.mask == "center" else cfg.data.image_size


def validate(cfg: Config) -> None:
    validate_backbone(cfg)
    inpainting, size = cfg.method.inpainting, cfg.data.image_size
    if cfg.model.arch != "vit" and size % resnet_stride(cfg):
        raise ConfigError(
            f"data.image_size: the decoder doubles the ResNet's feature map back to the input, so {size} px must "
            f"be a multiple of its stride {resnet_stride(cfg)} (model.resnet_stem={cfg.model.resnet_stem!r})"
        )
    if cfg.data.local_crops:
        raise ConfigError(f"data.local_crops: inpainting uses one crop per image, got {cfg.data.local_crops}")
    if inpainting.mask == "center" and inpainting.mask_size >= size:
        raise ConfigError(
            f"method.inpainting.mask_size: a {inpainting.mask_size} px hole leaves no context in data.image_size {size}"
        )
    if inpainting.mask == "random_blocks" and inpainting.block_size >= size:
        raise ConfigError(
            f"method.inpainting.block_size: a {inpainting.block_size} px block does not fit data.image_size {size}"
        )
    if judged_side(cfg) < 2**inpainting.disc_layers:
        raise ConfigError(
            f"method.inpainting.disc_layers: {inpainting.disc_layers} stride-2 layers need a judged region of at "
            f"least {2**inpainting.disc_layers} px, the discriminator sees {judged_side(cfg)} px"
        )


def build(cfg: Config) -> ContextEncoder:
    i = cfg.method.inpainting
    return ContextEncoder(
        build_backbone(cfg),
        i.mask,
        i.mask_size,
        i.blocks,
        i.block_size,
        i.rec_weight,
        i.adv_weight,
        i.disc_channels,
        i.disc_layers,
        i.decoder_hidden_dim,
        i.conv_decoder_width,
        mean=cfg.data.mean,
        std=cfg.data.std,
    )


def patch_discriminator_flops(side: int, in_channels: int, channels: int, layers: int) -> float:
    """`PatchDiscriminator` on a side x side input: 4x4 stride-2 convs halving the side, then a 3x3 conv to 1."""
    total, width, inputs = 0.0, channels, in_channels
    for _ in range(layers):
        side //= 2
        total += 2.0 * side * side * width * inputs * 16
        inputs, width = width, 2 * width
    return total + 2.0 * side * side * inputs * 9


def flops(cfg: Config) -> FlopCount:
    """Encoder and token decoder on the masked image, and the discriminator three times (real, detached fill,
    fill through detached parameters). The third pass trains nothing and is counted frozen, so its backward to
    the fill is left out of the training count, which about offsets the input gradients the 3 x forward rule
    counts but nobody computes (the pixels', the real region's): within 1% of torch's counter in the tests."""
    i, model = cfg.method.inpainting, cfg.model
    disc = patch_discriminator_flops(judged_side(cfg), model.in_chans, i.disc_channels, i.disc_layers)
    return backbone_flops(cfg, cfg.data.image_size) + FlopCount(decoder_flops(cfg) + 2 * disc, disc)


def decoder_flops(cfg: Config) -> float:
    i, model, size = cfg.method.inpainting, cfg.model, cfg.data.image_size
    if model.arch != "vit":
        stride = resnet_stride(cfg)
        stages = stride.bit_length() - 1
        return upsampling_decoder_flops(
            backbone_width(cfg), model.in_chans, size // stride, stages, i.conv_decoder_width
        )
    tokens = (size // model.patch_size) ** 2
    pixels = model.patch_size**2 * model.in_chans
    width = vit_width(cfg)
    dims = [width, i.decoder_hidden_dim, pixels] if i.decoder_hidden_dim else [width, pixels]
    return sum(linear_flops(tokens, a, b) for a, b in zip(dims[:-1], dims[1:]))


def discriminator_activations(side: int, channels: int, layers: int, act: int) -> int:
    """One `PatchDiscriminator` pass on a side x side region, its input not included: the first conv's output
    (the LeakyReLU's input) and the LeakyReLU's output (the next conv's input); each further layer's conv output
    (GroupNorm's input), GroupNorm's output and the LeakyReLU's output, and its fp32 mean and rstd per group;
    the final logits (softplus's input)."""
    side //= 2
    total = 2 * channels * side * side * act
    width = channels
    for _ in range(1, layers):
        side //= 2
        width *= 2
        total += 3 * width * side * side * act + 2 * min(32, width) * STAT
    return total + side * side * act


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample (ViT only): the encoder on the masked image, the token decoder, the fill and the L2 on the
    hole, and the discriminator's three passes (real, detached fill, fill through frozen weights), each of
    which also keeps its whole input image (the region is a view of it: the original and the filled image)."""
    if cfg.model.arch != "vit":  # the conv decoder's activations are not modelled yet
        raise ConfigError(f"model.arch: pretrain plan has no activation model of inpainting on {cfg.model.arch!r}")
    i, size, channels = cfg.method.inpainting, cfg.data.image_size, cfg.model.in_chans
    parts = encoder_activations(cfg, size, 1, act, checkpointing)
    tokens = (size // cfg.model.patch_size) ** 2
    # The decoder's input is a copy of the patch tokens (the cls row sliced off); an MLP adds GELU's in and out.
    parts["decoder"] = tokens * (vit_width(cfg) + 2 * i.decoder_hidden_dim) * act
    # The mask (fp32) that multiplies the prediction and the L2, and the fp32 difference the square keeps.
    parts["fill and L2"] = size * size * STAT + channels * size * size * STAT
    disc = discriminator_activations(judged_side(cfg), i.disc_channels, i.disc_layers, act)
    parts["discriminator"] = 3 * disc + 2 * channels * size * size * act
    return parts


# One random resized crop (and flip) per image; the mask is drawn in `forward`.
SPEC = MethodSpec(
    "inpainting",
    InpaintingConfig,
    build,
    single_crop_transform,
    validate=validate,
    device_transform=single_crop_device_transform,
    flops=flops,
    activations=activations,
    crop_views=single_crop_views,
)
