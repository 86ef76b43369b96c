"""The CUDA subset (`pytest -m cuda tests/test_cuda.py`, run by benchmarks/gpu_check.sh): compiled Triton
kernels against their references in bf16 and fp16, one bf16 training step per method, FSDP2 over NCCL
and DeepSpeed bf16 at world size 1, and DALI's nvJPEG decode. Without a GPU every test skips and says why.

The Triton kernels must be compiled here, not interpreted: run with TRITON_INTERPRET=0 (tests/conftest.py
sets it to 1 for the CPU suite unless it is already set), as gpu_check.sh does.
"""

import os
import socket
from pathlib import Path

import pytest
import torch

from data_pipeline.dali_loader import dali_available

from tiny import tiny_overrides

NO_GPU = "no CUDA device: the CUDA subset runs on a GPU machine (bash benchmarks/gpu_check.sh)"
INTERPRETED = "TRITON_INTERPRET=1 in this process: run the compiled kernels with TRITON_INTERPRET=0 (gpu_check.sh)"
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_GPU)]
needs_compiled_triton = pytest.mark.skipif(
    torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") == "1", reason=INTERPRETED
)

LOW_PRECISION = {torch.float16: dict(atol=2e-3, rtol=1e-2), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
METHODS = {
    "mae": [],
    "moco": ["method.name=moco", "method.moco.mlp_dim=64", "method.moco.proj_dim=32"],
    "dino": [
        "method.name=dino",
        "method.dino.out_dim=256",
        "method.dino.hidden_dim=64",
        "method.dino.bottleneck_dim=32",
        "data.local_crops=2",
        "data.local_crop_size=8",
    ],
    "dinov2": [
        "method.name=dinov2",
        "method.dinov2.out_dim=64",
        "method.dinov2.hidden_dim=32",
        "method.dinov2.bottleneck_dim=16",
        "model.layer_scale=0.1",
        "model.num_register_tokens=2",
        "data.local_crops=2",
        "data.local_crop_size=8",
    ],
    "dit": [
        "method.name=dit",
        "method.dit.space=pixel",
        "method.dit.in_channels=1",
        "method.dit.input_size=16",
        "method.dit.patch_size=4",
        "method.dit.hidden_dim=32",
        "method.dit.depth=2",
        "method.dit.num_heads=2",
        "method.dit.num_classes=10",
        "data.crop_scale=[1.0, 1.0]",
    ],
    "rotation": ["method.name=rotation"],
    "jigsaw": ["method.name=jigsaw", "method.jigsaw.tile_size=4", "method.jigsaw.gap=1", "method.jigsaw.jitter=1"],
    "relative_patch": [
        "method.name=relative_patch",
        "method.relative_patch.tile_size=4",
        "method.relative_patch.gap=1",
        "method.relative_patch.jitter=1",
    ],
    "inpainting": [
        "method.name=inpainting",
        "method.inpainting.mask_size=8",
        "method.inpainting.disc_channels=8",
        "method.inpainting.disc_layers=2",
    ],
    "colorization": [
        "method.name=colorization",
        "method.colorization.split_brain=true",
        "method.colorization.prior_images=8",
    ],
    "pixelcnn": [
        "method.name=pixelcnn",
        "method.pixelcnn.channels=1",
        "method.pixelcnn.hidden_channels=8",
        "method.pixelcnn.layers=2",
        "method.pixelcnn.num_classes=10",
        "data.crop_scale=[1.0, 1.0]",
    ],
    "vae": [
        "method.name=vae",
        "method.vae.downsample=4",
        "method.vae.base_channels=8",
        "method.vae.norm_groups=4",
        "method.vae.layers_per_block=1",
        "data.crop_scale=[1.0, 1.0]",
    ],
}


def _grads(fn, *inputs, upstream):
    inputs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*inputs)
    out.backward(upstream)
    return [out.detach().float(), *(x.grad.float() for x in inputs)]


@needs_compiled_triton
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 4, 197, 64), (1, 2, 257, 128), (2, 2, 100, 72)])
def test_triton_attention_compiled_matches_reference(dtype, shape, causal):
    from kernels.attention import attention, reference_attention

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, upstream = (torch.randn(shape, device="cuda", generator=gen, dtype=dtype) for _ in range(4))
    actual = _grads(lambda a, b, c: attention(a, b, c, backend="triton", causal=causal), q, k, v, upstream=upstream)
    expected = _grads(
        lambda a, b, c: reference_attention(a.float(), b.float(), c.float(), causal=causal),
        q,
        k,
        v,
        upstream=upstream.float(),
    )
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **LOW_PRECISION[dtype])


@needs_compiled_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "d"), [(512, 128), (1000, 256)])
def test_triton_infonce_compiled_matches_reference(dtype, n, d):
    from kernels.infonce import info_nce

    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k = (torch.randn(n, d, device="cuda", generator=gen, dtype=dtype) for _ in range(2))
    upstream = torch.ones((), device="cuda")
    actual = _grads(lambda a, b: info_nce(a, b, 0.2, impl="triton"), q, k, upstream=upstream)
    expected = _grads(lambda a, b: info_nce(a.float(), b.float(), 0.2, impl="reference"), q, k, upstream=upstream)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **LOW_PRECISION[dtype])


def _train(tmp_path: Path, shards: Path, *extra: str, steps: int = 1):
    from pretrain.recipes import load_config
    from pretrain.train import Trainer

    overrides = tiny_overrides(tmp_path, shards, "tracking.enabled=false", "run.device=cuda", *extra)
    cfg = load_config(None, [*overrides, f"train.steps={steps}", "optim.warmup_steps=0", "train.vis_every=0"])
    return Trainer(cfg).fit(save_final=False)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_bf16_step_per_method(tmp_path, digit_shards, method):
    result = _train(tmp_path, digit_shards, "train.precision=bf16", *METHODS[method])
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()


@pytest.mark.parametrize("backend", ["sdpa", "triton"])
def test_token_transformer_bf16_step_and_cached_sampling(backend):
    """The token transformer on the GPU: a bf16 step through causal attention (the compiled Triton kernel too),
    and sampling with the KV cache drawing the tokens of full recomputation (fp32, TF32 off)."""
    if backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip(INTERPRETED)
    from pretrain.methods.registry import build_method
    from pretrain.recipes import load_config

    overrides = ["method.gpt.hidden_dim=64", "method.gpt.depth=2", "method.gpt.num_heads=2"]
    sizes = ["method.gpt.vocab_size=64", "method.gpt.token_grid=8", "method.gpt.num_classes=10"]
    cfg = load_config(None, ["method.name=gpt", f"model.attn_backend={backend}", *overrides, *sizes])
    torch.manual_seed(0)
    method = build_method(cfg).cuda()
    tokens, labels = torch.randint(0, 64, (4, 8, 8), device="cuda"), torch.arange(4, device="cuda")
    with torch.autocast("cuda", torch.bfloat16):
        loss = method({"image": tokens, "label": labels})["loss"]
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in method.parameters())
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        draws = [
            method.generate(labels, torch.Generator(device="cuda").manual_seed(0), cfg_scale=2.0, use_cache=cache)
            for cache in (True, False)
        ]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert torch.equal(draws[0], draws[1])


@pytest.fixture
def world_of_one(monkeypatch):
    """RANK/WORLD_SIZE for one process, so the engines start NCCL at world size 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MASTER_PORT", str(port))
    yield
    from pretrain.distributed import destroy_distributed

    destroy_distributed()


def test_fsdp2_over_nccl_at_world_size_one(tmp_path, digit_shards, world_of_one):
    result = _train(tmp_path, digit_shards, "engine.kind=fsdp", "train.precision=bf16", steps=2)
    assert torch.distributed.get_backend() == "nccl"
    assert len(result.losses) == 2 and torch.isfinite(torch.tensor(result.losses)).all()


def test_deepspeed_bf16_at_world_size_one(tmp_path, digit_shards, world_of_one):
    result = _train(
        tmp_path, digit_shards, "engine.kind=deepspeed", "engine.deepspeed.zero_stage=2", "train.precision=bf16"
    )
    assert len(result.losses) == 1 and torch.isfinite(torch.tensor(result.losses)).all()


@pytest.mark.skipif(dali_available() is not None, reason=str(dali_available()))
def test_dali_gpu_decode_matches_the_cpu_pipeline_in_distribution(tmp_path):
    from data_pipeline.dali_loader import DaliLoader
    from data_pipeline.photo_like import photo_like_samples
    from data_pipeline.shard_writer import write_shards

    shards = write_shards(photo_like_samples(64, 160, 120), tmp_path / "ds", 16).shard_paths("train")
    means = {}
    for device in ("cpu", "cuda"):
        loader = DaliLoader(shards, batch_size=16, views=[(32, (0.3, 1.0))], single=True, device=device)
        batches = iter(loader)
        images = torch.cat([next(batches)["image"].float().cpu() for _ in range(4)])
        assert images.shape == (64, 3, 32, 32)
        means[device] = images.mean().item()
    first = next(iter(DaliLoader(shards, batch_size=16, views=[(32, (0.3, 1.0))], single=True, device="cuda")))
    assert first["image"].is_cuda and first["image"].dtype == torch.uint8
    assert abs(means["cpu"] - means["cuda"]) < 3.0  # the same images, differently cropped: similar mean level
