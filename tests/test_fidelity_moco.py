"""MoCo v3 as released: the predictor's last BatchNorm, the 12-head ViT-S, the row-first sin-cos table and
the split-qkv init; loss and gradients equal a direct implementation of the released conventions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pretrain.methods.moco import MoCoV3
from pretrain.methods.registry import build_method
from pretrain.models.pos_embed import sincos_pos_embed_2d
from pretrain.models.vit import VisionTransformer
from pretrain.recipes import load_config

from released_conventions import assert_close, moco_mlp, moco_v3_loss, row_first_sincos_table, vit_cls

REPO = Path(__file__).resolve().parents[1]
DEPTH, HEADS, PATCH, DIM = 2, 4, 4, 32


def tiny_moco(predictor_last_bn: bool = True) -> MoCoV3:
    torch.manual_seed(0)
    backbone = VisionTransformer(
        img_size=16, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
        sincos_row_first=True, init="xavier_split_qkv",
    )  # fmt: skip
    return MoCoV3(
        backbone, proj_dim=8, mlp_dim=24, temperature=0.2, infonce_impl="reference",
        predictor_last_bn=predictor_last_bn,
    )  # fmt: skip


def released_weights(moco: MoCoV3) -> tuple[dict, dict, dict]:
    """(base encoder + projector as `head.*`, momentum encoder + projector, predictor), released names,
    with the released fixed table (a zero cls row, then the row-first sin-cos rows)."""

    def encoder(backbone, projector) -> dict:
        w = {k: v for k, v in backbone.named_parameters()}
        w["pos_embed"] = row_first_sincos_table(backbone.grid_size, backbone.embed_dim)[None]
        w.update({f"head.{k}": v for k, v in projector.named_parameters()})
        return w

    base = encoder(moco.backbone, moco.projector)
    momentum = encoder(moco.momentum_backbone, moco.momentum_projector)
    return base, momentum, dict(moco.predictor.named_parameters())


def test_row_first_table_is_the_released_one():
    released = row_first_sincos_table(4, 32)
    assert torch.allclose(sincos_pos_embed_2d(4, 4, 32, cls_token=True, row_first=True), released, atol=1e-6)
    ours_default = sincos_pos_embed_2d(4, 4, 32, cls_token=True)
    assert not torch.allclose(ours_default, released, atol=1e-3)  # the MAE layout is its transpose
    transposed = released[1:].reshape(4, 4, 32).transpose(0, 1).reshape(16, 32)
    assert torch.allclose(ours_default[1:], transposed, atol=1e-6)


def test_predictor_ends_in_a_batchnorm_without_affine():
    predictor = tiny_moco().predictor
    assert type(predictor[-1]).__name__ == "GlobalBatchNorm1d" and predictor[-1].weight is None
    assert [type(m).__name__ for m in tiny_moco(predictor_last_bn=False).predictor][-1] == "Linear"
    out = predictor(torch.randn(10, 8))
    assert torch.allclose(out.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(out.var(0, unbiased=False), torch.ones(8), atol=1e-3)


def test_loss_and_gradients_equal_the_released_conventions():
    moco = tiny_moco()
    with torch.no_grad():  # the momentum twin differs from the online one, as after some training
        for p in [*moco.momentum_backbone.parameters(), *moco.momentum_projector.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    loss = moco({"image": views})["loss"]
    loss.backward()

    base, momentum, predictor = released_weights(moco)
    base = {k: v.detach().clone().requires_grad_(True) for k, v in base.items()}
    predictor = {k: v.detach().clone().requires_grad_(True) for k, v in predictor.items()}

    def query(x):
        return moco_mlp(predictor, "", moco_mlp(base, "head.", vit_cls(base, x, DEPTH, HEADS, PATCH, False), 3), 2)

    with torch.no_grad():
        k1, k2 = (moco_mlp(momentum, "head.", vit_cls(momentum, x, DEPTH, HEADS, PATCH, False), 3) for x in views)
    reference = moco_v3_loss(query(views[0]), query(views[1]), k1, k2, 0.2)
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    ours = {**{k: p for k, p in moco.backbone.named_parameters()}}
    ours.update({f"head.{k}": p for k, p in moco.projector.named_parameters()})
    for name, param in ours.items():
        if param.requires_grad:
            assert_close(param.grad, base[name].grad, name)
    for name, param in moco.predictor.named_parameters():
        assert_close(param.grad, predictor[name].grad, f"predictor.{name}")
    assert moco.backbone.patch_embed.proj.weight.grad is None  # frozen, as in the paper


def test_without_the_last_bn_the_loss_differs():
    """The point of the option: the old predictor gives another loss on the same weights."""
    with_bn, without = tiny_moco(True), tiny_moco(False)
    without.load_state_dict(with_bn.state_dict())
    views = [torch.randn(6, 3, 16, 16), torch.randn(6, 3, 16, 16)]
    assert with_bn({"image": views})["loss"].item() != pytest.approx(without({"image": views})["loss"].item(), rel=1e-3)


def test_split_qkv_init_and_tiny_cls():
    dim = 256
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=dim, depth=1, num_heads=4, init="xavier_split_qkv")
    qkv = vit.blocks[0].attn.qkv.weight
    bound = math.sqrt(6 / (dim + dim))  # Xavier of one [D, D] third
    assert qkv.abs().max() <= bound and qkv.abs().max() > 0.95 * bound
    for third in qkv.chunk(3):
        assert third.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.03)
    assert vit.cls_token.std().item() < 1e-5
    fused = VisionTransformer(img_size=16, patch_size=4, embed_dim=dim, depth=1, num_heads=4)
    assert fused.blocks[0].attn.qkv.weight.abs().max() <= math.sqrt(6 / (3 * dim + dim))  # one matrix: narrower


def test_paper_vit_s_recipe_has_12_heads_of_32():
    cfg = load_config(REPO / "configs/moco_v3_vit_s16.toml")
    assert (cfg.model.num_heads, cfg.model.sincos_order, cfg.model.init) == (12, "row_first", "xavier_split_qkv")
    assert cfg.method.moco.predictor_last_bn
    with torch.device("meta"):
        moco = build_method(cfg)
    attn = moco.backbone.blocks[0].attn
    assert (attn.num_heads, attn.head_dim) == (12, 32)
    assert moco.backbone.sincos_row_first and type(moco.predictor[-1]).__name__ == "GlobalBatchNorm1d"
