"""Network definitions: plain PyTorch modules that know nothing about distribution, precision or compile."""

from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.transformer import Attention, Block, Mlp, set_attention_backend
from pretrain.models.vit import VIT_SIZES, VisionTransformer, build_vit, count_parameters, patchify, unpatchify

__all__ = [
    "VIT_SIZES",
    "Attention",
    "Block",
    "Mlp",
    "VisionTransformer",
    "build_vit",
    "count_parameters",
    "patchify",
    "set_attention_backend",
    "sincos_pos_embed_2d",
    "unpatchify",
]
