"""The encoder backbone of the `model.*` section, shared by the methods that pretrain an encoder: a ViT
(`model.arch = "vit"`) or a ResNet (`resnet18`, `resnet50`).

ViT-only methods (MAE, MoCo v3, DINO) use the `*_vit_*` functions and reject other archs through
`validate_vit_backbone`; methods that take either (SimCLR) use `build_backbone`, `validate_backbone`,
`backbone_width` and `backbone_flops`. Each arch reads its own `model.*` fields and ignores the other's
(as recipes ignore the size knobs of other methods), so one override list can shrink every recipe.
"""

from __future__ import annotations

from pretrain.activation_memory import STAT, blocks_bytes, layer_norm_bytes, resnet_bytes, vit_block
from pretrain.config import Config, ConfigError, check_choice
from pretrain.flops import FlopCount, resnet_flops, vit_flops
from pretrain.models.resnet import RESNET_DEPTHS, STAGE_WIDTHS, ResNet, build_resnet
from pretrain.models.vit import VIT_SIZES, VisionTransformer, build_vit


def build_vit_backbone(
    cfg: Config, drop_path_rate: float = 0.0, drop_path_uniform: bool = False, mask_token: bool = False
) -> VisionTransformer:
    """The `model.*` ViT; `drop_path_rate` > 0 adds stochastic depth (fine-tuning, DINOv2's student), the
    same at every block with `drop_path_uniform`; `mask_token` for a method that masks patches (iBOT)."""
    model = cfg.model
    return build_vit(
        model.size,
        img_size=cfg.data.image_size,
        patch_size=model.patch_size,
        in_chans=model.in_chans,
        attn_backend=model.attn_backend,
        num_heads=model.num_heads,
        pos_embed=model.pos_embed,
        sincos_row_first=model.sincos_order == "row_first",
        pos_interpolation=model.pos_interpolation,
        init=model.init,
        drop_path_rate=drop_path_rate,
        drop_path_uniform=drop_path_uniform,
        drop_path_mode=model.drop_path_mode,
        layer_scale=model.layer_scale,
        ffn=model.ffn,
        num_register_tokens=model.num_register_tokens,
        mask_token=mask_token,
    )


_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module", "_orig_mod")


def clean_name(name: str) -> str:
    """A parameter name without the segments engine wrappers add."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


# Backbone parameters before the first block: layer 0 of the layer-wise learning-rate decay.
_LAYER_ZERO = ("cls_token", "pos_embed", "patch_embed", "register_tokens", "mask_token")


def vit_layer_decay(name: str, depth: int, decay: float) -> float:
    """decay^(depth + 1 - layer id) for the parameter `name` (clean, "backbone." first for the encoder's):
    ids as MAE's get_layer_id_for_vit and DINOv2's get_vit_lr_decay_rate, 0 for the patch embedding, tokens and
    positions, i + 1 for block i, depth + 1 (scale 1) for the rest of the encoder and anything outside it."""
    parts = name.split(".")
    layer = depth + 1
    if parts[0] == "backbone" and len(parts) > 1:
        if parts[1] in _LAYER_ZERO:
            layer = 0
        elif parts[1] == "blocks":
            layer = int(parts[2]) + 1
    return decay ** (depth + 1 - layer)


def resnet_depth(cfg: Config) -> int:
    return int(cfg.model.arch.removeprefix("resnet"))


def resnet_stride(cfg: Config) -> int:
    """The stages' total downsampling: the smallest input a ResNet maps to one cell."""
    return 32 if cfg.model.resnet_stem == "imagenet" else 8


def build_resnet_backbone(cfg: Config) -> ResNet:
    model = cfg.model
    return build_resnet(
        resnet_depth(cfg),
        0,
        model.in_chans,
        stem=model.resnet_stem,
        zero_init_residual=model.resnet_zero_init_residual,
        norm=model.resnet_norm,
    )


def build_backbone(cfg: Config) -> VisionTransformer | ResNet:
    return build_vit_backbone(cfg) if cfg.model.arch == "vit" else build_resnet_backbone(cfg)


def validate_vit_backbone(cfg: Config, model_key: str = "model.", size_key: str = "data.image_size") -> None:
    """`model_key`, `size_key`: where the messages say the settings are (a distillation's teacher's own)."""
    model, size = cfg.model, cfg.data.image_size
    if model.arch != "vit":
        raise ConfigError(f"{model_key}arch: method.name={cfg.method.name!r} trains a ViT only, got {model.arch!r}")
    check_choice(f"{model_key}size", model.size, VIT_SIZES)
    if size % model.patch_size:
        raise ConfigError(f"{size_key}: {size} is not a multiple of {model_key}patch_size {model.patch_size}")
    width = VIT_SIZES[model.size][0]
    if model.num_heads and width % model.num_heads:
        raise ConfigError(f"{model_key}num_heads: {model.num_heads} does not divide the width {width} of {model.size}")
    if model.pos_embed == "sincos" and width % 4:
        raise ConfigError(f"{model_key}pos_embed: a 2-D sin-cos table needs a width divisible by 4, got {width}")


def validate_backbone(cfg: Config) -> None:
    """Either arch. A ResNet's pooled feature is its global average, and BatchNorm layers would update
    their running statistics twice under activation checkpointing's recompute, so both are rejected."""
    if cfg.model.arch == "vit":
        validate_vit_backbone(cfg)
        return
    if cfg.eval.pool != "mean":
        raise ConfigError(f"eval.pool: a ResNet's pooled feature is the global average ('mean'), got {cfg.eval.pool!r}")
    if cfg.engine.activation_checkpointing:
        raise ConfigError(
            "engine.activation_checkpointing: the recompute would run the ResNet's BatchNorm layers a second "
            f"time and update their running statistics twice (model.arch={cfg.model.arch!r}); set false"
        )
    smallest = resnet_stride(cfg)
    if cfg.data.image_size < smallest:
        raise ConfigError(
            f"data.image_size: model.resnet_stem={cfg.model.resnet_stem!r} downsamples by {smallest}, "
            f"so a ResNet needs at least {smallest} px; got {cfg.data.image_size}"
        )


def vit_width(cfg: Config) -> int:
    return VIT_SIZES[cfg.model.size][0]


def backbone_width(cfg: Config) -> int:
    """The pooled feature's size."""
    if cfg.model.arch == "vit":
        return vit_width(cfg)
    kind, _ = RESNET_DEPTHS[resnet_depth(cfg)]
    return STAGE_WIDTHS[-1] * (1 if kind == "basic" else 4)


def vit_backbone_flops(
    cfg: Config, image_size: int, frozen_embed: bool = False, kept_patches: int | None = None
) -> FlopCount:
    """One image through the backbone; a frozen patch embedding (MoCo v3) gets no backward FLOPs."""
    dim, depth, _ = VIT_SIZES[cfg.model.size]
    model = cfg.model
    embed, body = vit_flops(
        image_size,
        model.patch_size,
        model.in_chans,
        dim,
        depth,
        kept_patches=kept_patches,
        prefix_tokens=1 + model.num_register_tokens,
        ffn=model.ffn,
    )
    return FlopCount(body, embed) if frozen_embed else FlopCount(embed + body)


def backbone_flops(cfg: Config, image_size: int) -> FlopCount:
    """One image through the backbone of either arch, all of it trained."""
    if cfg.model.arch == "vit":
        return vit_backbone_flops(cfg, image_size)
    return FlopCount(resnet_flops(resnet_depth(cfg), image_size, cfg.model.in_chans, cfg.model.resnet_stem))


def backbone_blocks(backbone: VisionTransformer | ResNet) -> list:
    """What the engine wraps (FSDP units, checkpointing, compile): a ViT's blocks, a ResNet's stages."""
    return backbone.stages() if isinstance(backbone, ResNet) else [backbone.blocks]


def backbone_no_weight_decay(backbone: VisionTransformer | ResNet, prefix: str = "backbone") -> set[str]:
    """A ViT's tokens and position table; a ResNet has none beyond the optimizer's ndim <= 1 rule."""
    if isinstance(backbone, ResNet):
        return set()
    return {f"{prefix}.{name}" for name in backbone.no_weight_decay()}


def validate_backbone_input(cfg: Config, size: int, key: str) -> None:
    """An input of `size` px that the backbone reads besides the image (a tile, a patch): whole ViT patches,
    or at least a ResNet's total stride. The message names `key` and the sizes."""
    if cfg.model.arch == "vit":
        if size % cfg.model.patch_size:
            raise ConfigError(f"{key}: {size} px is not a multiple of model.patch_size {cfg.model.patch_size}")
        return
    smallest = resnet_stride(cfg)
    if size < smallest:
        raise ConfigError(
            f"{key}: {size} px is smaller than the {smallest} px that model.arch={cfg.model.arch!r} with "
            f"model.resnet_stem={cfg.model.resnet_stem!r} downsamples to one cell"
        )


def validate_pool(cfg: Config, pool: str, key: str) -> None:
    """A ResNet's pooled feature is its global average; a ViT also has its cls token."""
    if cfg.model.arch != "vit" and pool != "mean":
        raise ConfigError(f"{key}: a ResNet's pooled feature is the global average ('mean'), got {pool!r}")


def encoder_activations(cfg: Config, size: int, count: int, act: int, checkpointing: bool) -> dict[str, int]:
    """Saved by `count` inputs of `size` px through the encoder per sample (views, tiles, patches, rotations).
    A ViT: the blocks, the patch embedding's input and the final norm; a ResNet: its convolutions' inputs,
    BatchNorms and ReLUs (activation_memory.resnet_bytes). Pooling saves nothing."""
    model = cfg.model
    if model.arch != "vit":
        saved = resnet_bytes(resnet_depth(cfg), size, model.in_chans, model.resnet_stem, act)
        return {f"encoder ({model.arch})": count * saved}
    dim, depth, heads = VIT_SIZES[model.size]
    tokens = (size // model.patch_size) ** 2 + 1
    return {
        "encoder blocks": count
        * blocks_bytes(vit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": count * model.in_chans * size**2 * act,
        "final norm": count * layer_norm_bytes(tokens, dim, act),
    }


def classifier_head_activations(in_dim: int, hidden_dim: int, classes: int, act: int) -> int:
    """A linear head, or Linear-GELU-Linear, and the fp32 cross-entropy over `classes`."""
    head = in_dim * act + (2 * hidden_dim * act + hidden_dim * act if hidden_dim else 0)
    return head + 2 * classes * STAT


class EncoderHooks:
    """The Method hooks of a method whose trained network is `self.backbone` (either arch): what eval and export
    use, what the engine wraps, and the backbone's weight-decay exclusions. Listed before `Method` in the bases."""

    backbone: VisionTransformer | ResNet

    def inference_network(self) -> VisionTransformer | ResNet:
        return self.backbone

    def transformer_blocks(self) -> list:
        return backbone_blocks(self.backbone)

    def no_weight_decay(self) -> set[str]:
        return backbone_no_weight_decay(self.backbone)
