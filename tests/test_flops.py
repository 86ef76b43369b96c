"""Analytic FLOP counts (pretrain/flops.py) against torch's FlopCounterMode and against published figures.

FlopCounterMode counts matrix products only (mm/addmm/bmm, convolutions, attention kernels) at 2 FLOPs per
multiply-add, as pretrain/flops.py does; softmax, normalizations, activations and losses are counted by
neither. On CPU it does not count SDPA's kernel, so the models here use the `reference` attention backend,
whose two matmuls it does count. With that, forwards agree exactly.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from pretrain.flops import device_peak_flops, vit_flops
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.recipes import load_config

BATCH = 3
SMALL = [
    "model.size=tiny",
    "model.patch_size=8",
    "model.attn_backend=reference",
    "data.image_size=32",
    f"data.batch_size={BATCH}",
]
METHODS = {
    "mae": ["method.name=mae", "method.mae.decoder_dim=64", "method.mae.decoder_depth=2", "method.mae.decoder_heads=2"],
    "moco": [
        "method.name=moco",
        "method.moco.mlp_dim=96",
        "method.moco.proj_dim=48",
        "method.moco.infonce_impl=reference",
    ],
    "moco_v2": [
        "method.name=moco_v2",
        "method.moco_v2.shuffle_bn=false",
        "method.moco_v2.queue_size=64",
        "method.moco_v2.mlp_hidden_dim=96",
        "method.moco_v2.proj_dim=48",
    ],
    "dino": [
        "method.name=dino",
        "data.local_crops=3",
        "data.local_crop_size=16",
        "method.dino.out_dim=128",
        "method.dino.hidden_dim=96",
        "method.dino.bottleneck_dim=32",
    ],
    # iBOT's masked-token count is random and KoLeo's neighbour search is not in the analytic count: both off.
    "dinov2": [
        "method.name=dinov2",
        "data.local_crops=3",
        "data.local_crop_size=16",
        "method.dinov2.out_dim=128",
        "method.dinov2.hidden_dim=96",
        "method.dinov2.bottleneck_dim=32",
        "method.dinov2.ibot_weight=0",
        "method.dinov2.koleo_weight=0",
        "model.num_register_tokens=2",
        "model.ffn=swiglu",
    ],
    # A distillation's patch loss covers every patch: iBOT counts exactly. The teacher is wider than the student.
    "dinov2_distill": [
        "method.name=dinov2",
        "data.local_crops=2",
        "data.local_crop_size=16",
        "method.dinov2.out_dim=128",
        "method.dinov2.hidden_dim=96",
        "method.dinov2.bottleneck_dim=32",
        "method.dinov2.ibot_separate_head=true",
        "method.dinov2.ibot_out_dim=64",
        "method.dinov2.koleo_weight=0",
        "method.dinov2.drop_path_rate=0",
        'method.dinov2.teacher_checkpoint="unread"',
        "method.dinov2.teacher_model.size=small",
        "method.dinov2.teacher_model.patch_size=8",
        "method.dinov2.teacher_image_size=32",
    ],
    # Every masked convolution runs dense, so the count is the full kernels'.
    "pixelcnn": [
        "method.name=pixelcnn",
        "method.pixelcnn.channels=3",
        "method.pixelcnn.hidden_channels=12",
        "method.pixelcnn.layers=5",
        "method.pixelcnn.first_kernel_size=3",
        "method.pixelcnn.num_classes=10",
        "data.image_size=8",
    ],
    "dit": [
        "method.name=dit",
        "method.dit.space=pixel",
        "method.dit.hidden_dim=96",
        "method.dit.depth=2",
        "method.dit.num_heads=3",
        "method.dit.input_size=16",
        "method.dit.patch_size=4",
        "method.dit.in_channels=3",
        "method.dit.num_classes=10",
    ],
}
# Diffusion distillation: the student's forward plus, without grad, two teacher steps (progressive), a teacher step
# and the EMA target (consistency), or the teacher on the doubled batch (guidance; only the student has the
# guidance-scale input).
for _mode, _guidance in (("progressive", "false"), ("consistency", "true"), ("guidance", "true")):
    METHODS[f"dit_distill_{_mode}"] = [
        *METHODS["dit"],
        "method.name=dit_distill",
        f"method.dit_distill.mode={_mode}",
        'method.dit_distill.teacher_checkpoint="unread"',
        f"method.dit.guidance_embed={_guidance}",
    ]


def small_batch(cfg) -> dict:
    gen = torch.Generator().manual_seed(0)
    size = cfg.data.image_size
    if cfg.method.name in ("dit", "dit_distill"):
        side, channels = cfg.method.dit.input_size, cfg.method.dit.in_channels
        return {
            "image": torch.randn(BATCH, channels, side, side, generator=gen),
            "label": torch.zeros(BATCH, dtype=torch.long),
        }
    if cfg.method.name == "pixelcnn":  # integer pixels
        pixels = torch.randint(0, 256, (BATCH, cfg.method.pixelcnn.channels, size, size), generator=gen)
        return {"image": pixels, "label": torch.zeros(BATCH, dtype=torch.long)}
    views = {
        "mae": [],
        "moco": [size, size],
        "moco_v2": [size, size],
        "dino": [size, size] + [cfg.data.local_crop_size] * cfg.data.local_crops,
        "dinov2": [size, size] + [cfg.data.local_crop_size] * cfg.data.local_crops,
    }
    sizes = views[cfg.method.name]
    if not sizes:
        return {"image": torch.randn(BATCH, 3, size, size, generator=gen)}
    return {"image": [torch.randn(BATCH, 3, s, s, generator=gen) for s in sizes]}


def counted(method, batch, backward: bool) -> float:
    with FlopCounterMode(display=False) as counter:
        out = method(batch)
        if backward:
            out["loss"].backward()
    return counter.get_total_flops() / BATCH


@pytest.mark.parametrize("name", list(METHODS))
def test_forward_matches_flop_counter(name):
    cfg = load_config(None, SMALL + METHODS[name])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    analytic = flops_per_sample(cfg)
    assert counted(method, small_batch(cfg), backward=False) == pytest.approx(analytic["forward"], rel=1e-9)


@pytest.mark.parametrize("name", list(METHODS))
def test_training_flops_bound_forward_plus_backward(name):
    """3 x forward for trained parts + 1 x for the rest is an upper bound the backward nearly reaches: it only
    skips input gradients nobody needs (of the pixels into the first layer, of detached keys, of the
    timestep features), under 3% of the total at these small sizes and less at real ones."""
    cfg = load_config(None, SMALL + METHODS[name])
    torch.manual_seed(0)
    method = build_method(cfg).train()
    analytic = flops_per_sample(cfg)["train"]
    measured = counted(method, small_batch(cfg), backward=True)
    assert 0.97 * analytic <= measured <= analytic * (1 + 1e-9)


def test_momentum_and_teacher_branches_count_once():
    """Forward-only branches add their forward once to the training count, trained ones three times."""
    for name in ("moco", "dino"):
        counts = flops_per_sample(load_config(None, SMALL + METHODS[name]))
        assert counts["forward"] < counts["train"] < 3 * counts["forward"]
    counts = flops_per_sample(load_config(None, SMALL + METHODS["mae"]))
    assert counts["train"] == pytest.approx(3 * counts["forward"])


@pytest.mark.parametrize(
    "dim,depth,published",
    [(192, 12, 1.3), (384, 12, 4.6), (768, 12, 17.6), (1024, 24, 61.6)],  # DeiT / ViT tables, 224 px, patch 16
)
def test_vit_matches_published_multiply_adds(dim, depth, published):
    """The published "GFLOPs" of ViT-Ti/S/B/L-16 at 224 (with the 1000-class head) are multiply-adds (fvcore's
    convention): half of our FLOPs. ViT-B/16: 17.56 G multiply-adds, 35.1 GFLOPs."""
    embed, body = vit_flops(224, 16, 3, dim, depth, num_classes=1000)
    assert (embed + body) / 2 / 1e9 == pytest.approx(published, abs=0.05)


@pytest.mark.parametrize("size,published", [("S", 6.06), ("B", 23.01), ("L", 80.71), ("XL", 118.64)])
def test_dit_matches_published_multiply_adds(size, published):
    """DiT paper's Gflops for /2 models on 32x32x4 latents (256 px), also multiply-adds. Theirs include the
    learned-variance half of the output layer (8 instead of 4 channels), 4.7M multiply-adds for XL/2."""
    cfg = load_config(None, ["method.name=dit", f"method.dit.size={size}", "method.dit.patch_size=2"])
    assert flops_per_sample(cfg)["forward"] / 2 / 1e9 == pytest.approx(published, rel=2e-3)


def test_dit_xl2_recipe_is_118_6_g_multiply_adds():
    cfg = load_config("configs/dit_xl2.toml")
    assert flops_per_sample(cfg)["forward"] / 2 / 1e9 == pytest.approx(118.6, abs=0.05)


def test_device_peaks(monkeypatch):
    assert device_peak_flops(torch.device("cpu")) is None
    assert device_peak_flops(torch.device("cpu"), override_tflops=2.5) == 2.5e12
    for name, peak in [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA GeForce RTX 4090", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert device_peak_flops(torch.device("cuda", 0)) == peak, name
