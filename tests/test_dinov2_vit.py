"""DINOv2's ViT parts: released parameter counts, registers kept out of the patch outputs, LayerScale,
SwiGLU, the mask token and the subset form of stochastic depth, each against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import ConfigError
from pretrain.flops import block_flops, linear_flops
from pretrain.models.transformer import Block, SwiGLU, add_residual_on_a_subset, swiglu_hidden
from pretrain.models.vit import build_vit
from pretrain.recipes import load_config


def dinov2_vit(size: str, **kwargs):
    """As DINOv2's hub models are built: patch 14 at 518 px (a 37 x 37 grid), learned table with a cls row,
    LayerScale 1e-5, a mask token; SwiGLU for giant2."""
    options = dict(img_size=518, patch_size=14, pos_embed="learned_cls", init="trunc_normal", layer_scale=1e-5)
    options |= dict(mask_token=True, ffn="swiglu" if size == "giant2" else "mlp")
    return build_vit(size, **(options | kwargs))


@pytest.mark.parametrize(
    "size,registers,released",
    [
        ("small", 0, 22_056_576),  # dinov2_vits14
        ("base", 0, 86_580_480),  # dinov2_vitb14
        ("large", 0, 304_368_640),  # dinov2_vitl14
        ("giant2", 0, 1_136_480_768),  # dinov2_vitg14
        ("small", 4, 22_058_112),  # dinov2_vits14_reg
        ("giant2", 4, 1_136_486_912),  # dinov2_vitg14_reg
    ],
)
def test_parameter_counts_match_the_released_models(size, registers, released):
    with torch.device("meta"):
        vit = dinov2_vit(size, num_register_tokens=registers)
    assert sum(p.numel() for p in vit.parameters()) == released


def test_giant2_swiglu_width_is_the_released_one():
    assert swiglu_hidden(1536, 4.0) == 4096
    assert swiglu_hidden(384, 4.0) == 1024
    with torch.device("meta"):
        block = dinov2_vit("giant2").blocks[0]
    assert tuple(block.mlp.w12.weight.shape) == (2 * 4096, 1536) and tuple(block.mlp.w3.weight.shape) == (1536, 4096)


def tiny_vit(**kwargs):
    torch.manual_seed(0)
    options = dict(img_size=16, patch_size=4, pos_embed="learned_cls", init="trunc_normal")
    return build_vit("tiny", **(options | kwargs)).eval()


def test_registers_sit_after_cls_and_stay_out_of_the_patch_outputs():
    vit = tiny_vit(num_register_tokens=3)
    images = torch.randn(2, 3, 16, 16)
    tokens = vit.forward_tokens(images)
    assert tokens.shape == (2, 1 + 3 + 16, 192) and vit.num_prefix_tokens == 4
    # The blocks' input: cls (with its position row), the registers as they are, the patches with positions.
    x = vit.embed(images)
    torch.testing.assert_close(x[:, 0], (vit.cls_token + vit.pos_embed[:, :1])[0].expand(2, -1))
    torch.testing.assert_close(x[:, 1:4], vit.register_tokens.expand(2, -1, -1))
    torch.testing.assert_close(x[:, 4:], vit.patch_embed(images) + vit.pos_embed[:, 1:])
    patches = vit.patch_tokens(tokens)
    assert patches.shape == (2, 16, 192)
    torch.testing.assert_close(vit.forward_features(images, pool="mean"), patches.mean(dim=1))
    torch.testing.assert_close(vit.forward_features(images, pool="cls"), tokens[:, 0])
    assert vit.last_attention(images).shape == (2, 3, 4, 4)
    # The registers do change what the patches see (they are attended to), so they are used, not ignored.
    plain = tiny_vit()
    plain.load_state_dict({k: v for k, v in vit.state_dict().items() if k != "register_tokens"})
    assert not torch.allclose(plain.patch_tokens(plain.forward_tokens(images)), patches)
    assert "register_tokens" in vit.no_weight_decay()


def test_mask_token_replaces_masked_patch_embeddings_before_positions():
    vit = tiny_vit(mask_token=True)
    with torch.no_grad():
        vit.mask_token.normal_()
    images = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5]] = True
    masks[1, 15] = True
    x, plain = vit.embed(images, masks=masks), vit.embed(images)
    expected = plain.clone()
    expected[:, 1:][masks] = (vit.mask_token + vit.pos_embed[0, 1:][None].expand(2, -1, -1)[masks]).detach()
    torch.testing.assert_close(x, expected)
    with pytest.raises(ValueError, match="mask token"):
        tiny_vit().embed(images, masks=masks)


def test_layer_scale_and_swiglu_block_is_the_formula():
    torch.manual_seed(0)
    block = Block(24, 3, layer_scale=0.5, ffn="swiglu").eval()
    with torch.no_grad():
        block.ls1.gamma.uniform_()
        block.ls2.gamma.uniform_()
    x = torch.randn(2, 5, 24)
    mlp = block.mlp
    assert isinstance(mlp, SwiGLU) and mlp.w3.in_features == swiglu_hidden(24, 4.0) == 64
    h = x + block.ls1.gamma * block.attn(block.norm1(x))
    n = block.norm2(h)
    a, b = (n @ mlp.w12.weight.T + mlp.w12.bias).split(64, dim=-1)
    expected = h + block.ls2.gamma * ((F.silu(a) * b) @ mlp.w3.weight.T + mlp.w3.bias)
    torch.testing.assert_close(block(x), expected)
    # A (re)initialization starts every LayerScale at its value again.
    vit = tiny_vit(layer_scale=1e-5)
    with torch.no_grad():
        vit.blocks[3].ls2.gamma.fill_(7.0)
    vit.init_weights()
    assert torch.equal(vit.blocks[3].ls2.gamma, torch.full((192,), 1e-5))


def test_subset_stochastic_depth_runs_the_branch_on_kept_samples_only():
    x = torch.randn(8, 5, 6)
    seen = []

    def branch(rows):
        seen.append(rows.shape[0])
        return rows * 2 + 1

    torch.manual_seed(3)
    out = add_residual_on_a_subset(x, branch, 0.6)
    torch.manual_seed(3)
    kept = torch.randperm(8)[:3]  # max(1, int(8 * 0.4)) = 3
    assert seen == [3]
    expected = x.clone()
    expected[kept] += (x[kept] * 2 + 1) * 8 / 3
    torch.testing.assert_close(out, expected)
    # A block uses it above a rate of 0.1 in training, per-sample drop path below it, nothing in eval.
    high = Block(6, 2, drop_path=0.3, drop_path_mode="subset")
    low = Block(6, 2, drop_path=0.1, drop_path_mode="subset")
    assert high.subset_drop == 0.3 and low.subset_drop == 0.0 and high.uses_randomness
    high.eval()
    torch.testing.assert_close(high(x), x + high.attn_branch(x) + high.mlp_branch(x + high.attn_branch(x)))


def test_uniform_drop_path_and_the_linear_rule():
    uniform = tiny_vit(drop_path_rate=0.4, drop_path_uniform=True)
    linear = tiny_vit(drop_path_rate=0.4)
    assert [b.drop_path.p for b in uniform.blocks] == [0.4] * 12
    assert linear.blocks[0].drop_path.__class__.__name__ == "Identity" and linear.blocks[-1].drop_path.p == 0.4


def test_flops_count_the_registers_and_the_swiglu():
    dim, hidden, tokens = 1536, 4096, 257
    attention = linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim) + 4.0 * tokens * tokens * dim
    swiglu = linear_flops(tokens, dim, 2 * hidden) + linear_flops(tokens, hidden, dim)
    assert block_flops(tokens, dim, 4.0, "swiglu") == attention + swiglu
    cfg = load_config(None, ["method.name=dino", "model.size=small", "model.num_register_tokens=4"])
    plain = load_config(None, ["method.name=dino", "model.size=small"])
    from pretrain.methods.backbone import vit_backbone_flops

    grown = vit_backbone_flops(cfg, 224).trained - vit_backbone_flops(plain, 224).trained
    assert grown == 12 * (block_flops(197 + 4, 384) - block_flops(197, 384))


def test_mae_rejects_registers_naming_the_key():
    with pytest.raises(ConfigError, match="model.num_register_tokens"):
        load_config(None, ["method.name=mae", "model.size=tiny", "model.num_register_tokens=4"])


def test_pca_picture_finds_the_planted_object_and_colours_its_parts():
    from pretrain.visualize import patch_pca_rgb

    generator = torch.Generator().manual_seed(5)
    features = torch.randn(3, 6, 6, 16, generator=generator) * 0.1
    obj = torch.zeros(6, 6, dtype=torch.bool)
    obj[1:5, 2:5] = True  # a centred object of three parts (its rows 1-2, 3, 4)
    parts = [torch.randn(16, generator=generator) * 3 for _ in range(3)]
    offset = torch.randn(16, generator=generator) * 10
    for row, part in zip((1, 3, 4), (0, 1, 2)):
        rows = slice(row, row + 2) if row == 1 else slice(row, row + 1)
        features[:, rows, 2:5] += offset + parts[part]
    rgb, foreground = patch_pca_rgb(features)
    assert torch.equal(foreground, obj.expand(3, -1, -1))
    assert torch.equal(patch_pca_rgb(-features)[1], foreground)  # the component's sign does not matter
    assert rgb.shape == (3, 3, 6, 6) and rgb.min() >= 0 and rgb.max() <= 1
    assert (rgb.permute(0, 2, 3, 1)[~foreground.expand(3, -1, -1)] == 0).all()  # background black
    colours = [rgb[0, :, row, 3] for row in (1, 3, 4)]
    assert all((a - b).abs().max() > 0.3 for i, a in enumerate(colours) for b in colours[i + 1 :])
    torch.testing.assert_close(rgb[0, :, 1, 2], rgb[0, :, 2, 4], atol=0.1, rtol=0)  # one part, one colour
