"""ViT structure (published parameter counts), fixed sin-cos positions, pooling, patches and backend switching."""

import math

import pytest
import torch

from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.transformer import set_attention_backend
from pretrain.models.vit import (
    VisionTransformer,
    build_vit,
    count_parameters,
    patchify,
    unpatchify,
)

# timm, 224 px, 1000 classes, learned position embedding (which we replace by a fixed buffer).
PUBLISHED = [
    ("tiny", 16, 5_717_416),
    ("small", 16, 22_050_664),
    ("base", 16, 86_567_656),
    ("large", 16, 304_326_632),
    ("huge", 14, 632_045_800),
]


def _tiny_vit(**kwargs) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, **kwargs)


@pytest.mark.parametrize(("size", "patch", "published"), PUBLISHED)
def test_parameter_count_matches_published(size: str, patch: int, published: int) -> None:
    with torch.device("meta"):
        model = build_vit(size, img_size=224, patch_size=patch, num_classes=1000)
    trainable = count_parameters(model)
    pos_embed_entries = (1 + (224 // patch) ** 2) * model.embed_dim
    print(
        f"ViT-{size}/{patch}: trainable {trainable:,} + learned pos-embed {pos_embed_entries:,} "
        f"= {trainable + pos_embed_entries:,}; published {published:,}"
    )
    assert trainable + pos_embed_entries == published
    assert count_parameters(model, trainable_only=False) == trainable


def test_pos_embed_is_a_fixed_buffer_outside_the_state_dict() -> None:
    model = _tiny_vit()
    assert "pos_embed" in dict(model.named_buffers())
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(4, 4, 32), atol=0, rtol=0)


def test_sincos_shape_cls_row_and_known_values() -> None:
    grid_h, grid_w, dim = 3, 5, 16
    embed = sincos_pos_embed_2d(grid_h, grid_w, dim, cls_token=True)
    assert embed.shape == (1 + grid_h * grid_w, dim) and embed.dtype == torch.float32
    assert torch.equal(embed[0], torch.zeros(dim))
    patches = embed[1:]
    quarter = dim // 4
    omega = [10000 ** (-i / quarter) for i in range(quarter)]
    for row in range(grid_h):
        for col in range(grid_w):
            token = patches[row * grid_w + col]  # row-major, like a conv patch embedding
            expected = (
                [math.sin(col * w) for w in omega]
                + [math.cos(col * w) for w in omega]
                + [math.sin(row * w) for w in omega]
                + [math.cos(row * w) for w in omega]
            )
            torch.testing.assert_close(token, torch.tensor(expected), atol=1e-6, rtol=0)
    # sin^2 + cos^2 = 1 per frequency: every position has the same norm, sqrt(dim / 2).
    torch.testing.assert_close(patches.norm(dim=1), torch.full((grid_h * grid_w,), math.sqrt(dim / 2)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(2, 2, 6)


def test_init_follows_the_mae_recipe() -> None:
    model = build_vit("small", img_size=64, patch_size=16, num_classes=10)
    conv = model.patch_embed.proj.weight
    fan_in, fan_out = conv[0].numel(), conv.shape[0]
    assert conv.abs().max() <= math.sqrt(6 / (fan_in + fan_out))  # xavier-uniform bound of the flattened view
    assert model.patch_embed.proj.bias.abs().sum() == 0
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0
    assert torch.equal(model.norm.weight, torch.ones(384))
    assert 0.015 < model.cls_token.std() < 0.025


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_forward_shapes(pool: str) -> None:
    images = torch.randn(2, 3, 32, 32)
    encoder = _tiny_vit(pool=pool)
    assert encoder.forward_tokens(images).shape == (2, 17, 32)
    assert encoder.forward_features(images).shape == (2, 32)
    assert encoder(images).shape == (2, 32)
    assert _tiny_vit(num_classes=10, pool=pool)(images).shape == (2, 10)


def test_pooling_definitions() -> None:
    encoder = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    tokens = encoder.forward_tokens(images)
    torch.testing.assert_close(encoder.forward_features(images, pool="cls"), tokens[:, 0])
    torch.testing.assert_close(encoder.forward_features(images, pool="mean"), tokens[:, 1:].mean(1))
    with pytest.raises(ValueError, match="unknown pool"):
        encoder.forward_features(images, pool="max")


def test_keep_indices_select_positioned_patches() -> None:
    """Encoding a subset equals encoding only those patches with their own positions (MAE's contract)."""
    encoder = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    keep = torch.tensor([[0, 5, 15], [3, 2, 9]])
    tokens = encoder.forward_tokens(images, keep_indices=keep)
    assert tokens.shape == (2, 4, 32)
    embedded = encoder.patch_embed(images) + encoder.pos_embed
    selected = torch.stack([embedded[i, keep[i]] for i in range(2)])
    x = torch.cat([encoder.cls_token.expand(2, -1, -1), selected], dim=1)
    for block in encoder.blocks:
        x = block(x)
    torch.testing.assert_close(tokens, encoder.norm(x))


def test_attention_backend_switch_gives_same_output() -> None:
    encoder = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    sdpa_out = encoder.forward_tokens(images)
    set_attention_backend(encoder, "reference")
    assert all(block.attn.attn_backend == "reference" for block in encoder.blocks)
    torch.testing.assert_close(encoder.forward_tokens(images), sdpa_out, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend(encoder, "nope")
    with pytest.raises(ValueError, match="unknown attention backend"):
        _tiny_vit(attn_backend="nope")


def test_patchify_round_trip_and_layout() -> None:
    images = torch.randn(2, 3, 32, 32)
    patches = patchify(images, 8)
    assert patches.shape == (2, 16, 8 * 8 * 3)
    # Patch (row 1, col 2) is token 1 * 4 + 2; inside it pixels run (row, col, channel).
    torch.testing.assert_close(patches[:, 6].reshape(2, 8, 8, 3), images[:, :, 8:16, 16:24].permute(0, 2, 3, 1))
    assert torch.equal(unpatchify(patches, 8, 3), images)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 3, 30, 32), 8)


def test_wrong_image_size_and_unknown_size_fail_clearly() -> None:
    with pytest.raises(ValueError, match=r"unknown ViT size 'gigantic'; available: tiny, small, base, large, huge"):
        build_vit("gigantic")
    with pytest.raises(ValueError, match="image size 36x36 is not divisible by the patch size 8"):
        _tiny_vit()(torch.randn(1, 3, 36, 36))


def test_other_input_sizes_use_resampled_positions() -> None:
    """A local crop at half the size sees the same span of positions, resampled; the training size is exact."""
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)
    assert vit.position_embedding(32, 32) is vit.pos_embed
    table = vit.pos_embed.reshape(4, 4, 32)
    small = vit.position_embedding(16, 16).reshape(2, 2, 32)
    # Bicubic downsampling by 2 puts each output between input positions; corners stay near the corners.
    assert (small[0, 0] - table[:2, :2].reshape(4, 32).mean(0)).abs().max() < 0.2
    assert vit(torch.randn(2, 3, 16, 16)).shape == (2, 32)
    images = torch.randn(2, 3, 32, 32)
    attn = vit.last_attention(images)
    assert attn.shape == (2, 4, 4, 4)
    # Rows of the full attention sum to 1: patches get all of the cls token's attention but its share on itself.
    x = torch.cat([vit.cls_token.expand(2, -1, -1), vit.patch_embed(images) + vit.pos_embed], dim=1)
    block = vit.blocks[-1]
    full = block.attn.attention_weights(block.norm1(x))
    torch.testing.assert_close(attn.sum(dim=(2, 3)), 1 - full[:, :, 0, 0], atol=1e-5, rtol=0)


def test_init_weights_restores_meta_built_model() -> None:
    """Build on meta, materialize, init: the buffer is filled again (it is not in checkpoints)."""
    with torch.device("meta"):
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=4)
    model.to_empty(device="cpu")
    model.init_weights()
    torch.testing.assert_close(model.pos_embed[0], sincos_pos_embed_2d(4, 4, 32), atol=0, rtol=0)
    assert model(torch.randn(1, 3, 32, 32)).isfinite().all()
