"""DINO as released: learned positions with a cls row, the (g + 0.1) / G resampling for local crops, the
trunc-normal init and the head's last layer at nn.Linear's init, the per-epoch teacher temperature and the
0-based momentum; loss and gradients equal a direct implementation of the released conventions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from data_pipeline.manifest import Manifest
from pretrain.methods.dino import DINO, steps_per_epoch
from pretrain.methods.registry import build_method
from pretrain.models.vit import VisionTransformer
from pretrain.recipes import load_config

from released_conventions import (
    assert_close,
    cosine_momentum,
    dino_head,
    dino_loss,
    teacher_temperatures,
    vit_cls,
)

REPO = Path(__file__).resolve().parents[1]
DEPTH, HEADS, PATCH, DIM = 2, 4, 4, 32


def released_vit(**kwargs) -> VisionTransformer:
    options = dict(img_size=32, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS)
    return VisionTransformer(
        **options, pos_embed="learned_cls", pos_interpolation="scale_offset", init="trunc_normal", **kwargs
    )


def tiny_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    options = dict(out_dim=20, hidden_dim=24, bottleneck_dim=16, head_layers=3, norm_last_layer=False)
    return DINO(released_vit(), **{**options, **kwargs})


def test_learned_table_has_a_cls_row_added_to_the_cls_token():
    vit = released_vit()
    assert isinstance(vit.pos_embed, torch.nn.Parameter) and vit.pos_embed.shape == (1, 1 + 64, DIM)
    assert "pos_embed" in vit.state_dict()
    images = torch.randn(2, 3, 32, 32)
    reference = vit_cls(dict(vit.named_parameters()), images, DEPTH, HEADS, PATCH, cls_position=True)
    assert torch.allclose(vit.forward_features(images), reference, atol=1e-5)
    with torch.no_grad():
        vit.pos_embed[:, 0].add_(torch.randn(DIM))  # the cls row matters
    assert not torch.allclose(vit.forward_features(images), reference, atol=1e-3)
    shifted = vit_cls(dict(vit.named_parameters()), images, DEPTH, HEADS, PATCH, cls_position=True)
    assert torch.allclose(vit.forward_features(images), shifted, atol=1e-5)
    learned = VisionTransformer(
        img_size=32, patch_size=PATCH, embed_dim=DIM, depth=1, num_heads=HEADS, pos_embed="learned"
    )
    assert learned.pos_embed.shape == (1, 64, DIM)


def cubic_sample(values: list[float], u: float, a: float = -0.75) -> float:
    """The table read at fractional position u with the cubic convolution kernel (a = -0.75, as bicubic
    resampling in PyTorch), edge rows repeated."""

    def weight(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a if x < 2 else 0.0

    base = math.floor(u)
    taps = range(base - 1, base + 3)
    return sum(values[min(max(j, 0), len(values) - 1)] * weight(u - j) for j in taps)


def test_local_crops_sample_the_table_g_plus_0_1_apart():
    """Row i of a g-grid crop reads the G-grid table at (i + 0.5) G / (g + 0.1) - 0.5, positions G / (g + 0.1)
    apart, not at the (i + 0.5) G / g - 0.5 of a resize to g."""
    G, g = 8, 4
    vit = VisionTransformer(img_size=G * PATCH, patch_size=PATCH, embed_dim=4, depth=1, num_heads=1,
                            pos_embed="learned", pos_interpolation="scale_offset")  # fmt: skip
    table = [float(r * r) for r in range(G)]  # a table that varies along the rows only
    with torch.no_grad():
        vit.pos_embed.copy_(torch.tensor(table).repeat_interleave(G).view(1, -1, 1).expand(1, G * G, 4))
    sampled = vit.position_embedding(g * PATCH, g * PATCH)[0, :, 0].view(g, g)
    assert torch.allclose(sampled, sampled[:, :1].expand(g, g))
    for i in range(g):
        assert sampled[i, 0].item() == pytest.approx(cubic_sample(table, (i + 0.5) * G / (g + 0.1) - 0.5), abs=1e-4)
    resized = VisionTransformer(
        img_size=G * PATCH, patch_size=PATCH, embed_dim=4, depth=1, num_heads=1, pos_embed="learned"
    )
    resized.load_state_dict(vit.state_dict())
    plain = resized.position_embedding(g * PATCH, g * PATCH)[0, :, 0].view(g, g)
    for i in range(g):
        assert plain[i, 0].item() == pytest.approx(cubic_sample(table, (i + 0.5) * G / g - 0.5), abs=1e-4)
    assert not torch.allclose(plain, sampled, atol=1e-2)
    assert torch.equal(vit.position_embedding(G * PATCH, G * PATCH), vit.pos_embed)  # the full size: the table


def test_loss_and_gradients_equal_the_released_conventions():
    dino = tiny_dino()
    with torch.no_grad():
        for p in [*dino.teacher_backbone.parameters(), *dino.teacher_head.parameters()]:
            p.add_(0.01 * torch.randn_like(p))
        dino.center.normal_(std=0.1)
    center = dino.center.clone()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    loss = dino({"image": views})["loss"]
    loss.backward()

    student = {k: v.detach().clone().requires_grad_(True) for k, v in dino.backbone.named_parameters()}
    student.update({f"head.{k}": v.detach().clone().requires_grad_(True) for k, v in dino.head.named_parameters()})
    teacher = {k: v.detach() for k, v in dino.teacher_backbone.named_parameters()}
    teacher.update({f"head.{k}": v.detach() for k, v in dino.teacher_head.named_parameters()})

    def outputs(w, images):
        return dino_head(w, "head.", vit_cls(w, images, DEPTH, HEADS, PATCH, cls_position=True), 3)

    with torch.no_grad():
        teacher_out = [outputs(teacher, v) for v in views[:2]]
    reference = dino_loss([outputs(student, v) for v in views], teacher_out, center, 0.1, 0.04)
    reference.backward()

    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    ours = {k: p for k, p in dino.backbone.named_parameters()}
    ours.update({f"head.{k}": p for k, p in dino.head.named_parameters()})
    for name, param in ours.items():
        assert_close(param.grad, student[name].grad, name)
    assert student["pos_embed"].grad[0, 0].abs().sum() > 0  # the cls position is trained


def test_trunc_normal_init_and_the_heads_last_layer():
    vit = VisionTransformer(img_size=32, patch_size=4, embed_dim=256, depth=2, num_heads=4,
                            pos_embed="learned_cls", init="trunc_normal")  # fmt: skip
    for weight in (vit.blocks[0].attn.qkv.weight, vit.blocks[1].mlp.fc1.weight, vit.pos_embed, vit.cls_token):
        assert weight.std().item() == pytest.approx(0.02, rel=0.1)
    conv = vit.patch_embed.proj.weight  # PyTorch's default: U(+-1/sqrt(fan_in))
    assert conv.abs().max() <= 1 / math.sqrt(conv[0].numel()) + 1e-6
    released = tiny_dino(out_dim=512, bottleneck_dim=256).head.last_layer.weight_v.norm(dim=1).mean().item()
    assert released == pytest.approx(1 / math.sqrt(3), rel=0.05)  # ~0.58
    old = tiny_dino(out_dim=512, bottleneck_dim=256, last_layer_init="trunc_normal").head.last_layer.weight_v
    assert old.norm(dim=1).mean().item() == pytest.approx(0.32, rel=0.05)


def test_teacher_temperature_per_epoch_is_the_released_schedule():
    per_epoch, warmup_epochs, epochs = 3, 4, 6
    dino = tiny_dino(teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=warmup_epochs,
                     steps_per_epoch=per_epoch)  # fmt: skip
    released = teacher_temperatures(0.04, 0.07, warmup_epochs, epochs)
    for step in range(epochs * per_epoch):
        dino.steps_done.fill_(step)
        assert dino.teacher_temperature().item() == pytest.approx(released[step // per_epoch], abs=1e-7), step
    dino.steps_done.fill_((warmup_epochs - 1) * per_epoch)
    assert dino.teacher_temperature().item() == pytest.approx(0.07)  # final from epoch W - 1
    per_step = tiny_dino(
        teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_steps=warmup_epochs * per_epoch
    )
    per_step.steps_done.fill_((warmup_epochs - 1) * per_epoch)
    assert per_step.teacher_temperature().item() < 0.07  # the per-step ramp reaches it at W


def test_teacher_momentum_is_indexed_from_zero():
    total = 50
    released = cosine_momentum(0.99, total)
    dino = tiny_dino(momentum=0.99)
    # The loop calls ema_momentum(step) after optimizer step `step` (1 after the first).
    for index in range(total):
        assert dino.ema_momentum(index + 1, total) == pytest.approx(released[index], abs=1e-12)
    old = tiny_dino(momentum=0.99, momentum_index="one_based")
    assert old.ema_momentum(1, total) == pytest.approx(released[1]) and old.ema_momentum(1, total) != released[0]


def test_steps_per_epoch_come_from_the_manifest_and_the_global_batch(digit_shards):
    overrides = [f'data.shards="{digit_shards}"', "data.batch_size=16", "optim.accum_steps=2"]
    cfg = load_config(REPO / "configs/dino_vit_tiny_digits.toml", overrides)
    # The 1,437 training digits of conftest's shards, global batch 16 x 2 x 1 process.
    assert Manifest.load(digit_shards).num_samples("train") == 1437
    assert steps_per_epoch(cfg) == 1437 // 32
    cfg = load_config(REPO / "configs/dino_vit_tiny_digits.toml", [*overrides, "method.dino.steps_per_epoch=7"])
    assert steps_per_epoch(cfg) == 7


def test_paper_recipes_set_the_released_conventions():
    for name, warmup in (("dino_vit_s16", 30), ("dino_vit_b16", 50)):
        cfg = load_config(REPO / f"configs/{name}.toml")
        model, dino = cfg.model, cfg.method.dino
        assert (model.pos_embed, model.pos_interpolation, model.init) == ("learned_cls", "scale_offset", "trunc_normal")
        assert (dino.warmup_teacher_temp_epochs, dino.warmup_teacher_temp_steps) == (warmup, 0)
        assert (dino.momentum_index, dino.last_layer_init) == ("zero_based", "linear_default")
    cfg = load_config(REPO / "configs/dino_vit_s16.toml", ["method.dino.steps_per_epoch=1251"])
    with torch.device("meta"):
        method = build_method(cfg)
    assert method.steps_per_epoch == 1251 and method.warmup_teacher_temp_epochs == 30
    assert method.backbone.pos_embed.shape == (1, 197, 384)
