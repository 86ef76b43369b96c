"""DINOv2 distillation (the paper's section 5): a frozen, pretrained teacher of another size trains the student
with the same losses, without iBOT masks; the student's spare EMA is the final model. The teacher comes from a
checkpoint only when a run starts; it stays frozen, resumes exactly, shards like the student, and a distilled
run's checkpoint is used without the teacher's files."""

from __future__ import annotations

import copy
import math
import shutil

import pytest
import torch
from dist_engine_runs import run_config
from engine_runs import CASES, check_case
from test_dinov2 import DINOV2_TINY, dinov2_config, tiny_method, views

from kernels.dino_loss import dino_cross_entropy
from pretrain.ckpt.load import load_method
from pretrain.config import ConfigError
from pretrain.methods.dinov2 import check_teacher
from pretrain.methods.dinov2_losses import ibot_patch_loss, koleo_loss, sinkhorn_knopp
from pretrain.methods.registry import build_method
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import assert_equal_states

# The teacher of these tests: a ViT-small/4 trained 2 steps by dinov2 (the tiny runs' settings otherwise).
TEACHER_MODEL = [
    "method.dinov2.teacher_model.size=small",
    "method.dinov2.teacher_model.patch_size=4",
    "method.dinov2.teacher_model.layer_scale=0.1",
    "method.dinov2.teacher_model.num_register_tokens=2",
    "method.dinov2.teacher_model.pos_embed=learned_cls",
    "method.dinov2.teacher_model.init=trunc_normal",
    "method.dinov2.teacher_image_size=16",
]


def distill_method(*extra: str):
    return tiny_method(
        'method.dinov2.teacher_checkpoint="unread"', "method.dinov2.drop_path_rate=0", *TEACHER_MODEL, *extra
    )


@pytest.fixture(scope="module")
def teacher(module_tmp, digit_shards):
    out = module_tmp("teacher")
    return Trainer(dinov2_config(out, digit_shards, "model.size=small", "train.steps=2")).fit().checkpoint


def test_the_student_sees_no_masks_and_the_patch_loss_covers_every_patch():
    method = distill_method("method.dinov2.centering=sinkhorn_knopp")
    assert method.teacher_backbone.embed_dim == 384 and method.backbone.embed_dim == 192
    assert method.backbone.mask_token is None and method.teacher_backbone.mask_token is None
    images = views()
    out = method({"image": images})
    g = torch.cat(images[:2])
    tokens = method.backbone.forward_tokens(g)  # no masks
    cls = torch.cat([tokens[:, 0]] + [method.backbone.forward_features(v, pool="cls") for v in images[2:]])
    student = method.head(cls).view(4, 4, -1)
    patches = method.backbone.patch_tokens(tokens)
    with torch.no_grad():
        teacher_tokens = method.teacher_backbone.forward_tokens(g)
        targets = sinkhorn_knopp(method.teacher_head(teacher_tokens[:, 0]), 0.07).view(2, 4, -1)
        teacher_patches = method.teacher_head(method.teacher_backbone.patch_tokens(teacher_tokens).flatten(0, 1))
        patch_targets = sinkhorn_knopp(teacher_patches, 0.07, count=teacher_patches.shape[0])
    every = torch.ones(8, 16, dtype=torch.bool)
    dino = dino_cross_entropy(student, targets, 0.1)
    ibot = ibot_patch_loss(method.head(patches.flatten(0, 1)), patch_targets, every, 0.1)
    koleo = sum(koleo_loss(chunk) for chunk in tokens[:, 0].chunk(2))
    torch.testing.assert_close(out["dino_loss"], dino)
    torch.testing.assert_close(out["ibot_loss"], ibot)
    torch.testing.assert_close(out["loss"], dino + ibot + 0.1 * koleo)
    assert float(out["masked_tokens"]) == 16  # every patch of every global crop


def test_only_the_student_learns_and_its_ema_is_the_final_network():
    method = distill_method()
    assert method.inference_network() is method.ema_backbone
    assert [pair[0] for pair in method.ema_pairs()] == [method.ema_backbone]
    trained = {name for name, p in method.named_parameters() if p.requires_grad}
    assert trained and all(name.startswith(("backbone.", "head.")) for name in trained)
    assert method.teacher_sources() == ("teacher_backbone.", "teacher_head.")
    assert torch.equal(method.ema_backbone.pos_embed, method.backbone.pos_embed)  # the EMA starts at the student


def test_a_teacher_whose_last_layer_norm_was_fixed_loads_with_norms_of_one():
    method = distill_method()
    dino_teacher = build_method(
        load_config(
            None,
            [
                "method.name=dino",
                "method.dino.out_dim=64",
                "method.dino.hidden_dim=32",
                "method.dino.bottleneck_dim=16",
                "model.size=small",
                "model.patch_size=4",
                "model.layer_scale=0.1",
                "model.num_register_tokens=2",
                "model.pos_embed=learned_cls",
                "data.image_size=16",
            ],
        )
    )
    saved = {f"teacher_{k}": v for k, v in dino_teacher.teacher_backbone.state_dict(prefix="backbone.").items()}
    saved |= {f"teacher_{k}": v for k, v in dino_teacher.teacher_head.state_dict(prefix="head.").items()}
    assert "teacher_head.last_layer.weight_g" not in saved
    state = method.teacher_state(saved)
    assert torch.equal(state["teacher_head.last_layer.weight_g"], torch.ones(64, 1))
    method.load_state_dict(state, strict=False)
    x = torch.randn(3, 384)
    torch.testing.assert_close(method.teacher_head(x), dino_teacher.teacher_head(x))
    saved["teacher_backbone.norm.weight"] = torch.ones(7)
    with pytest.raises(ConfigError, match=r"method\.dinov2\.teacher_checkpoint.*teacher_backbone\.norm\.weight"):
        method.teacher_state(saved)


def teacher_run(*extra: str):
    model = [o for o in DINOV2_TINY if o.startswith("model.")]
    return load_config(
        None,
        ["model.size=small", "model.patch_size=4", "data.image_size=16"]
        + [o for o in DINOV2_TINY if o not in model]
        + model
        + list(extra),
    )


def student_config(*extra: str):
    return load_config(
        None,
        ["model.size=tiny", "model.patch_size=4", "data.image_size=16", *DINOV2_TINY]
        + ['method.dinov2.teacher_checkpoint="t"', *TEACHER_MODEL, *extra],
    )


@pytest.mark.parametrize(
    "teacher_extra, student_extra, key",
    [
        ([], ["method.dinov2.teacher_model.size=base"], r"method\.dinov2\.teacher_model\.size: .*'small'"),
        ([], ["method.dinov2.teacher_image_size=32"], r"method\.dinov2\.teacher_image_size"),
        (["method.dinov2.out_dim=32"], [], r"method\.dinov2\.out_dim"),
        (["method.dinov2.ibot_separate_head=true"], [], r"method\.dinov2\.ibot_separate_head"),
        (['method.dinov2.teacher_checkpoint="x"', *TEACHER_MODEL], [], r"teacher_checkpoint: .*distilled dinov2"),
        (["method.name=mae", "model.num_register_tokens=0"], [], r"teacher_checkpoint: .*'mae' run"),
    ],
)
def test_a_teacher_that_does_not_fit_fails_naming_the_key(teacher_extra, student_extra, key):
    check_teacher(student_config(), teacher_run())  # the teacher the settings describe fits
    with pytest.raises(ConfigError, match=key):
        check_teacher(student_config(*student_extra), teacher_run(*teacher_extra))


def test_a_teacher_of_another_patch_grid_fails_while_the_ibot_loss_pairs_patches():
    patch8 = teacher_run("model.patch_size=8")
    with pytest.raises(ConfigError, match=r"method\.dinov2\.teacher_model\.patch_size: the iBOT loss"):
        check_teacher(student_config("method.dinov2.teacher_model.patch_size=8"), patch8)
    check_teacher(student_config("method.dinov2.teacher_model.patch_size=8", "method.dinov2.ibot_weight=0"), patch8)


def test_distillation_resumes_bit_identically_with_the_teacher_frozen(tmp_path, digit_shards, teacher):
    extra = [f'method.dinov2.teacher_checkpoint="{teacher}"', "method.dinov2.drop_path_rate=0", *TEACHER_MODEL]
    full = Trainer(dinov2_config(tmp_path / "straight", digit_shards, *extra, "train.steps=4")).fit()
    cfg = dinov2_config(tmp_path / "split", digit_shards, *extra, "train.steps=4")
    first = Trainer(cfg).fit(until=2)
    shutil.move(teacher.parent.parent, tmp_path / "moved")  # a resume reads its teacher from its own checkpoint
    try:
        resumed = Trainer(cfg)
        assert resumed.step == 2 and resumed.teacher is None
        second = resumed.fit()
        # Without the teacher's files, the distilled checkpoint still rebuilds: the config records the teacher.
        _, method, _ = load_method(full.checkpoint)
    finally:
        shutil.move(tmp_path / "moved", teacher.parent.parent)
    assert first.losses + second.losses == full.losses
    assert all(math.isfinite(loss) for loss in full.losses)
    _, source, _ = load_method(teacher)
    for part in ("teacher_backbone", "teacher_head"):
        saved = {k: v for k, v in getattr(source, part).state_dict().items() if k != "mask_token"}
        assert_equal_states(getattr(method, part).state_dict(), saved, part)
    straight = Trainer(dinov2_config(tmp_path / "straight", digit_shards, *extra, "train.steps=4"))
    states = []
    for checkpoint in (second.checkpoint, full.checkpoint):
        straight.engine.load_tensors(straight.model, straight.optimizer, checkpoint)
        states.append(copy.deepcopy(straight.model.state_dict()))
    assert_equal_states(states[0], states[1], "model (frozen teacher and the student's EMA included)")
    ema, student = method.ema_backbone.state_dict(), method.backbone.state_dict()
    assert not torch.equal(ema["blocks.0.attn.qkv.weight"], student["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("dinov2_distill")])
def test_two_ranks_match_one_process_with_the_teacher_sharded(engine_runs, case) -> None:
    """FSDP and ZeRO-3 shard the frozen teacher like the student; it comes out as it was built."""
    state = check_case(engine_runs, case)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        built = build_method(run_config(CASES[case][0], engines=False)).state_dict()
    finally:
        torch.set_default_dtype(default)
    teacher = [name for name in built if name.startswith(("teacher_backbone.", "teacher_head."))]
    assert teacher
    for name in teacher:
        assert torch.equal(state[name], built[name].float()), name
