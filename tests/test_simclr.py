"""SimCLR: NT-Xent over the global batch (the paper's formula, across 2 ranks), the method on ResNet and
ViT encoders, and every engine at 2 ranks equal to one process with BatchNorm in the encoder."""

from __future__ import annotations

import math

import pytest
import torch
from dist_engine_runs import simclr_overrides
from dist_simclr_gather import global_embeddings
from engine_runs import CASES, check_case

from pretrain.config import ConfigError
from pretrain.methods.simclr import nt_xent_loss
from pretrain.recipes import load_config
from pretrain.train import Trainer

from test_engines import REPO, torchrun
from tiny import tiny_overrides


def nt_xent_formula(first: torch.Tensor, second: torch.Tensor, tau: float) -> torch.Tensor:
    """The paper's equation (1) and algorithm 1, term by term: views 2k-1 and 2k are the pair of image k,
    l(i, j) = -log exp(s_ij / tau) / sum_{m != i} exp(s_im / tau), L = 1/2N sum_k [l(2k-1, 2k) + l(2k, 2k-1)]."""
    z = torch.stack([first, second], dim=1).reshape(-1, first.shape[1])  # interleaved: 2k-1, 2k
    z = z / z.norm(dim=1, keepdim=True)
    two_n = z.shape[0]

    def term(i: int, j: int) -> torch.Tensor:
        s = [z[i] @ z[m] for m in range(two_n)]
        denominator = sum(torch.exp(s[m] / tau) for m in range(two_n) if m != i)
        return -torch.log(torch.exp(s[j] / tau) / denominator)

    return sum(term(2 * k, 2 * k + 1) + term(2 * k + 1, 2 * k) for k in range(two_n // 2)) / two_n


@pytest.mark.parametrize("impl", ["reference", "tiled", "triton"])
def test_nt_xent_is_the_papers_formula(impl) -> None:
    first, second = (x.double() for x in global_embeddings())
    if impl == "triton":
        first, second = first.float(), second.float()
    z = torch.cat([first, second]).requires_grad_(True)
    loss = nt_xent_loss(z, 0.3, impl)
    expected_z = z.detach().clone().requires_grad_(True)
    expected = nt_xent_formula(expected_z[:8], expected_z[8:], 0.3)
    loss.backward(), expected.backward()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if impl == "triton" else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(loss, expected, **tolerance)
    torch.testing.assert_close(z.grad, expected_z.grad, **tolerance)
    # 2N - 2 = 14 negatives: a loss at chance is log(15), not log(16)
    same = torch.ones(16, 4, dtype=z.dtype)
    assert float(nt_xent_loss(same, 0.3, impl)) == pytest.approx(math.log(15), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["tiled", "triton"])
def test_nt_xent_across_two_ranks_is_one_process_over_the_global_batch(tmp_path, impl) -> None:
    out = tmp_path / "gather.pt"
    torchrun(2, [str(REPO / "tests/dist_simclr_gather.py"), str(out), impl], TRITON_INTERPRET="1")
    ranks = torch.load(out)
    first, second = global_embeddings()
    z = torch.cat([first, second]).requires_grad_(True)
    expected = nt_xent_formula(z[:8], z[8:], 0.3)
    expected.backward()
    torch.testing.assert_close(torch.stack([r["loss"] for r in ranks]).mean(), expected.detach())
    # rank r holds [view 1 of images 4r..4r+3; view 2 of them]; its gradient covers every rank's loss through
    # the gathered negatives, and averaging over ranks (as DDP does) gives the global batch's gradient
    grads = [r["grad"] for r in ranks]
    per_rank = torch.cat([g[:4] for g in grads] + [g[4:] for g in grads]) / 2
    torch.testing.assert_close(per_rank, z.grad, rtol=1e-4, atol=1e-6)


def resnet_run(out, shards, *extra: str) -> list[str]:
    """The tiny run with the ViT's settings left out."""
    run = [s for s in tiny_overrides(out, shards) if not s.startswith("model.")]
    return [*run, *simclr_overrides(), "tracking.enabled=false", *extra]


def test_simclr_trains_a_resnet_and_its_encoder_is_evaluable(tmp_path, digit_shards) -> None:
    cfg = load_config(None, resnet_run(tmp_path, digit_shards, "optim.name=lars", "optim.base_lr=0.3", "train.steps=3"))
    trainer = Trainer(cfg)
    encoder = trainer.method.inference_network()
    assert type(encoder).__name__ == "ResNet" and encoder.embed_dim == 512
    # the engine made every BatchNorm global; the residual stages are what it wraps
    assert {type(m).__name__ for m in trainer.method.modules()} >= {"GlobalBatchNorm", "GlobalBatchNorm1d"}
    assert [len(stage) for stage in trainer.method.transformer_blocks()] == [2, 2, 2, 2]
    before = encoder.layer1[0].conv1.weight.detach().clone()
    result = trainer.fit()
    assert len(result.losses) == 3 and all(math.isfinite(x) for x in result.losses)
    assert not torch.equal(encoder.layer1[0].conv1.weight, before)
    pictures = trainer.method.visuals({"image": [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]})
    assert pictures["views_and_nearest"].dtype == torch.uint8
    assert trainer.method.inference_network().forward_features(torch.randn(2, 3, 16, 16)).shape == (2, 512)


def test_simclr_on_a_vit_encoder(tmp_path, digit_shards) -> None:
    sets = ["method.name=simclr", "method.simclr.proj_hidden_dim=32", "method.simclr.proj_dim=16"]
    cfg = load_config(None, tiny_overrides(tmp_path, digit_shards, *sets, "train.steps=2", "tracking.enabled=false"))
    result = Trainer(cfg).fit()
    assert len(result.losses) == 2 and all(math.isfinite(x) for x in result.losses)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.arch=resnet18", "method.simclr.pool=cls"], "method.simclr.pool: a ResNet's pooled feature"),
        (["model.arch=resnet50", "engine.activation_checkpointing=true"], "engine.activation_checkpointing"),
        (["model.arch=resnet18", "data.image_size=16"], "data.image_size: model.resnet_stem='imagenet'"),
        (["data.local_crops=2"], "data.local_crops: SimCLR uses exactly two views"),
        (["method.simclr.temperature=0"], "method.simclr.temperature"),
    ],
)
def test_bad_simclr_configs_fail_naming_the_key(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, ["method.name=simclr", *overrides])


def test_mae_rejects_a_resnet() -> None:
    with pytest.raises(ConfigError, match="model.arch: method.name='mae' trains a ViT only"):
        load_config(None, ["model.arch=resnet50"])


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("simclr-")])
def test_two_ranks_match_one_process_with_batch_norm(engine_runs, case) -> None:
    """Same global batch, same steps: parameters, BN running statistics and losses agree (the BN batch
    statistics and the negatives span both ranks)."""
    state = check_case(engine_runs, case)
    bn = "backbone.layer3.1.bn2.running_mean"
    assert not torch.equal(state[bn], torch.zeros_like(state[bn]))


@pytest.mark.parametrize("prefix", ["", "module.encoder_q."], ids=["torchvision", "moco_v2"])
def test_a_torchvision_resnet_imports_as_the_encoder_and_exports(tmp_path, prefix) -> None:
    """A torchvision-layout ResNet-18 file (with its fc, or MoCo v2's query encoder with an MLP head as fc)
    becomes the encoder of a step-0 checkpoint; `ckpt export` writes it back under the same names."""
    from safetensors.torch import load_file

    from pretrain.ckpt.export import export_weights
    from pretrain.ckpt.import_checkpoint import import_checkpoint
    from pretrain.models.resnet import build_resnet

    torch.manual_seed(5)
    released = build_resnet(18, num_classes=10, stem="small")
    for module in released.modules():  # running statistics that are not the initial ones
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    file = {f"{prefix}{k}": v for k, v in released.state_dict().items()}
    torch.save({"state_dict": file} if prefix else file, tmp_path / "resnet.pth")
    overrides = [*simclr_overrides(), f'run.output_dir="{tmp_path}"']
    done = import_checkpoint("torchvision_resnet", tmp_path / "resnet.pth", None, tmp_path / "run", overrides)
    dropped = prefix.removeprefix("module.")  # the file's common module. prefix is stripped first
    assert done["dropped"] == [f"{dropped}fc.weight", f"{dropped}fc.bias"]
    export_weights(done["checkpoint"], tmp_path / "encoder.safetensors")
    exported = load_file(tmp_path / "encoder.safetensors")
    expected = {k: v for k, v in released.state_dict().items() if not k.startswith("fc.")}
    assert exported.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value.to(exported[key].dtype), msg=key)
    with pytest.raises(ValueError, match="model.arch"):
        import_checkpoint("torchvision_resnet", tmp_path / "resnet.pth", None, tmp_path / "vit", ["method.name=simclr"])
