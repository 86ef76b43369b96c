"""DINOv2 end to end: the loss assembled from its parts, a frozen teacher without stochastic depth, masks
that do not depend on how the batch is split, learning-rate scales, config errors, exact resume, and two
ranks (DDP, FSDP, ZeRO-3) equal to one process."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from engine_runs import CASES, check_case
from PIL import Image

from kernels.dino_loss import dino_cross_entropy
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.methods.block_masking import BlockMasking, ibot_masks
from pretrain.methods.dinov2_losses import sinkhorn_knopp
from pretrain.methods.registry import build_method
from pretrain.models.transformer import DropPath
from pretrain.optim import learning_rate, scaled_lr
from pretrain.recipes import load_config

from tiny import assert_equal_states, check_resume, tiny_overrides

REPO = Path(__file__).resolve().parents[1]

DINOV2_TINY = [
    "method.name=dinov2",
    "method.dinov2.out_dim=64",
    "method.dinov2.hidden_dim=32",
    "method.dinov2.bottleneck_dim=16",
    "model.layer_scale=0.1",
    "model.num_register_tokens=2",
    "model.pos_embed=learned_cls",
    "model.init=trunc_normal",
    "data.local_crops=2",
    "data.local_crop_size=8",
]


def tiny_method(*extra: str):
    cfg = load_config(
        None,
        ["model.size=tiny", "model.patch_size=4", "data.image_size=16", "data.batch_size=4"]
        + DINOV2_TINY
        + list(extra),
    )
    torch.manual_seed(0)
    return build_method(cfg).train()


def views(batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    sizes = [16, 16, 8, 8]
    return [torch.randn(batch, 3, s, s, generator=generator) for s in sizes]


def test_loss_is_dino_plus_ibot_plus_koleo_computed_directly():
    method = tiny_method(
        "method.dinov2.drop_path_rate=0", "method.dinov2.mask_probability=1.0", "method.dinov2.centering=sinkhorn_knopp"
    )
    images = views()
    out = method({"image": images})
    method._micro = 0  # draw the same masks again
    masks = method.draw_masks(2, 4, torch.device("cpu"))
    assert masks.any(dim=1).all()  # every global crop masked at probability 1
    g = torch.cat(images[:2])
    tokens = method.backbone.forward_tokens(g, masks=masks)
    cls = torch.cat([tokens[:, 0]] + [method.backbone.forward_features(v, pool="cls") for v in images[2:]])
    student = method.head(cls).view(4, 4, -1)
    with torch.no_grad():
        teacher_tokens = method.teacher_backbone.forward_tokens(g)
        targets = sinkhorn_knopp(method.teacher_head(teacher_tokens[:, 0]), 0.07).view(2, 4, -1)
        patch_logits = method.teacher_head(teacher_tokens[:, 3:][masks])
        patch_targets = sinkhorn_knopp(patch_logits, 0.07, count=int(masks.sum()))
    dino = dino_cross_entropy(student, targets, 0.1)
    # iBOT: per crop the mean cross-entropy over its masked tokens, averaged over the 8 global crops.
    student_patches = method.head(tokens[:, 3:][masks])
    per_token = -(patch_targets * F.log_softmax(student_patches / 0.1, dim=-1)).sum(-1)
    counts = masks.sum(1)
    row = masks.nonzero()[:, 0]
    ibot = sum(per_token[row == b].sum() / counts[b] for b in range(8)) / 8
    # KoLeo: within each global crop's 4 cls tokens, summed over the two crops.
    koleo = 0.0
    for chunk in tokens[:, 0].detach().chunk(2):
        x = F.normalize(chunk, dim=-1)
        koleo += -sum(math.log(min(float((x[i] - x[j]).norm()) for j in range(4) if j != i)) for i in range(4)) / 4
    assert out["dino_loss"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert out["ibot_loss"].item() == pytest.approx(float(ibot.detach()), rel=1e-5)
    assert out["koleo_loss"].item() == pytest.approx(koleo, rel=1e-4)
    expected = out["dino_loss"] + out["ibot_loss"] + 0.1 * out["koleo_loss"]
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_teacher_is_frozen_and_has_no_stochastic_depth():
    method = tiny_method("method.dinov2.drop_path_rate=0.2", "method.dinov2.ibot_separate_head=true")
    teacher_before = copy.deepcopy(method.teacher_backbone.state_dict())
    method({"image": views()})["loss"].backward()
    teacher = [
        *method.teacher_backbone.parameters(),
        *method.teacher_head.parameters(),
        *method.teacher_ibot_head.parameters(),
    ]
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert method.backbone.mask_token.grad is not None and method.ibot_head.mlp[0].weight.grad.abs().sum() > 0
    assert_equal_states(method.teacher_backbone.state_dict(), teacher_before, "teacher")
    assert set(method.visuals({"image": views()})) == {"attention", "pca"}
    assert any(isinstance(m, DropPath) for m in method.backbone.modules())
    assert not any(isinstance(m, DropPath) for m in method.teacher_backbone.modules())
    # The averaged twins start equal, the iBOT head's included.
    for teacher_net, student_net in method.ema_pairs():
        for t, s in zip(teacher_net.state_dict().values(), student_net.state_dict().values()):
            assert torch.equal(t, s)


def test_masks_of_a_rank_are_its_rows_of_the_global_draw():
    masking = BlockMasking(4)
    whole = ibot_masks(range(0, 16), 16, masking, 0.5, (0.1, 0.5), seed=7)
    halves = torch.cat(
        [
            ibot_masks(range(0, 8), 16, masking, 0.5, (0.1, 0.5), 7),
            ibot_masks(range(8, 16), 16, masking, 0.5, (0.1, 0.5), 7),
        ]
    )
    assert torch.equal(whole, halves) and int(whole.any(1).sum()) == 8
    # The method's: a new draw every micro-batch and step, the same again for the same (step, micro-batch).
    method = tiny_method()
    first, second = method.draw_masks(2, 4, torch.device("cpu")), method.draw_masks(2, 4, torch.device("cpu"))
    assert not torch.equal(first, second)
    method._micro = 0
    assert torch.equal(method.draw_masks(2, 4, torch.device("cpu")), first)
    method.on_step_end(0, 10)
    assert method._micro == 0 and not torch.equal(method.draw_masks(2, 4, torch.device("cpu")), first)


def test_learning_rate_scales_are_dinov2s():
    method = tiny_method()  # 12 blocks, layer decay 0.9, patch embedding x 0.2
    assert method.lr_scale("backbone.patch_embed.proj.weight") == pytest.approx(0.9**13 * 0.2)
    assert method.lr_scale("backbone.cls_token") == pytest.approx(0.9**13)
    assert method.lr_scale("backbone.register_tokens") == pytest.approx(0.9**13)
    assert method.lr_scale("backbone.blocks.0.attn.qkv.weight") == pytest.approx(0.9**12)
    assert method.lr_scale("backbone.blocks.11._checkpoint_wrapped_module.mlp.fc1.weight") == pytest.approx(0.9)
    assert method.lr_scale("backbone.norm.weight") == method.lr_scale("head.mlp.0.weight") == 1.0
    assert method.no_weight_decay() == set()
    # The release's sqrt_wrt_1024 scaling rule, with an absolute floor.
    cfg = load_config(None, ["optim.lr_scaling=sqrt", "optim.base_lr=2e-4", "optim.min_lr=1e-6"]).optim
    assert scaled_lr(cfg, 4096) == pytest.approx(4e-4)
    assert learning_rate(cfg, 100, 100, scaled_lr(cfg, 4096)) == pytest.approx(1e-6)  # linear scaling: 2e-6


@pytest.mark.parametrize(
    "config,overrides,released",
    [
        ("dinov2_vitg14.toml", [], 1_136_480_768),  # dinov2_vitg14
        ("dinov2_vitl14.toml", ["model.ffn=mlp"], 304_368_640),  # dinov2_vitl14 (distilled: the MLP)
    ],
)
def test_recipes_build_the_released_encoders(config, overrides, released):
    """At the released 518 px (a 37 x 37 position table); the recipes pretrain at 224."""
    cfg = load_config(REPO / "configs" / config, [*overrides, "data.image_size=518"])
    with torch.device("meta"):
        method = build_method(cfg)
    assert sum(p.numel() for p in method.teacher_backbone.parameters()) == released
    assert method.ibot_separate_head and cfg.method.dinov2.centering == "sinkhorn_knopp"


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["data.batch_size=1"], "method.dinov2.koleo_weight"),
        (["method.dinov2.mask_ratio_min=0.6"], "method.dinov2.mask_ratio_min"),
        (["data.local_crop_size=6"], "data.local_crop_size"),
        (["method.dinov2.centering=mean"], "method.dinov2.centering"),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        tiny_method(*overrides)
    if overrides == ["data.batch_size=1"]:
        tiny_method(*overrides, "method.dinov2.koleo_weight=0")  # without KoLeo one sample a rank is fine


def dinov2_config(out: Path, shards: Path, *extra: str):
    return load_config(
        None,
        tiny_overrides(
            out,
            shards,
            "tracking.enabled=false",
            *DINOV2_TINY,
            "method.dinov2.warmup_teacher_temp_steps=4",
            "method.dinov2.freeze_last_layer_steps=2",
            "method.dinov2.drop_path_rate=0.2",
            *extra,
        ),
    )


@pytest.mark.parametrize("centering", ["sinkhorn_knopp", "centering"])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, digit_shards, centering):
    extra = [f"method.dinov2.centering={centering}", "model.drop_path_mode=subset"]
    if centering == "centering":
        extra += ["method.dinov2.ibot_separate_head=true", "method.dinov2.ibot_out_dim=48"]
    config = lambda out, *more: dinov2_config(out, digit_shards, *extra, *more)  # noqa: E731
    full, _, _ = check_resume(config, tmp_path, "model (teacher, centers and step counter included)")
    if centering == "sinkhorn_knopp":  # the finished run's picture, from the command line
        out = tmp_path / "pca.png"
        assert main(["viz", "pca", "--checkpoint", str(full.checkpoint), "--out", str(out), "--num", "4"]) == 0
        with Image.open(out) as picture:
            assert picture.size == (4 * 18 + 2, 2 * 18 + 2)  # 4 images of 16 px over their maps, 2 px apart
        assert main(["viz", "pca", "--checkpoint", str(full.checkpoint), "--out", str(out), "--num", "0"]) == 2


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("dinov2")])
def test_two_ranks_match_one_process(engine_runs, case) -> None:
    """Same global batch, same steps: parameters, teacher, centers and losses agree (the masks are drawn per
    row of the global batch; Sinkhorn-Knopp's sums span both ranks)."""
    state = check_case(engine_runs, case)
    assert any(name.startswith("teacher_backbone.") for name in state)


def test_a_finetune_takes_the_teacher_encoder_without_the_mask_token():
    method = tiny_method()
    encoder = method.teacher_backbone.state_dict()
    assert "mask_token" in encoder and "register_tokens" in encoder
    model = [o for o in DINOV2_TINY if o.startswith("model.")]
    cfg = load_config(
        None,
        [
            "method.name=finetune",
            "method.finetune.num_classes=10",
            "model.size=tiny",
            "model.patch_size=4",
            "data.image_size=16",
            *model,
        ],
    )
    finetune = build_method(cfg)
    state = finetune.initial_state(encoder)
    assert "classifier.backbone.mask_token" not in state
    assert torch.equal(state["classifier.backbone.register_tokens"], encoder["register_tokens"])
    assert torch.equal(state["classifier.backbone.blocks.0.ls1.gamma"], encoder["blocks.0.ls1.gamma"])
