"""ResNet-18/50 in torchvision's layout (counts, names, FLOPs) and BatchNorm over the global batch."""

from __future__ import annotations

import pytest
import torch
from dist_global_bn import global_bn_batch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from pretrain.engines.batch_norm import GlobalBatchNorm, convert_to_global_batch_norm
from pretrain.flops import resnet_flops
from pretrain.models.resnet import build_resnet

from test_engines import REPO, torchrun


@pytest.mark.parametrize(("depth", "count"), [(18, 11_689_512), (50, 25_557_032)])
def test_parameter_counts_with_the_1000_class_head(depth, count) -> None:
    with torch.device("meta"):
        model = build_resnet(depth, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == count


def test_parameter_names_follow_torchvision() -> None:
    with torch.device("meta"):
        state = build_resnet(50, num_classes=1000).state_dict()
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv3.weight", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.num_batches_tracked", "layer3.5.bn2.bias", "layer4.2.bn3.weight", "fc.bias"):  # fmt: skip
        assert key in state, key
    assert "layer1.1.downsample.0.weight" not in state
    assert tuple(state["layer4.2.conv3.weight"].shape) == (2048, 512, 1, 1)
    with torch.device("meta"):
        basic = build_resnet(18).state_dict()
    assert "fc.weight" not in basic and "layer2.0.downsample.0.weight" in basic and "layer1.0.conv3.weight" not in basic


@pytest.mark.parametrize(("depth", "stem", "size"), [(18, "imagenet", 64), (50, "imagenet", 64), (18, "small", 16)])
def test_flops_match_torchs_counter_and_features_are_pooled(depth, stem, size) -> None:
    model = build_resnet(depth, num_classes=10, stem=stem)
    with FlopCounterMode(display=False) as counter:
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 10)
    assert counter.get_total_flops() == 2 * resnet_flops(depth, size, 3, stem, num_classes=10)
    assert model.forward_features(torch.randn(2, 3, size, size)).shape == (2, model.embed_dim)
    with pytest.raises(ValueError, match="global average"):
        model.forward_features(torch.randn(1, 3, size, size), pool="cls")


def test_resnet50_flops_are_the_published_4_1_gmacs() -> None:
    assert resnet_flops(50, 224) / 2 == pytest.approx(4.09e9, rel=0.01)


def test_small_stem_keeps_the_resolution_and_zero_init_residual() -> None:
    model = build_resnet(18, stem="small", zero_init_residual=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and isinstance(model.maxpool, nn.Identity)
    assert all(float(block.bn2.weight.detach().abs().sum()) == 0 for stage in model.stages() for block in stage)


def test_global_batch_norm_on_one_process_is_torchs_batch_norm() -> None:
    reference = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        reference.bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
    model = convert_to_global_batch_norm(nn.Sequential(nn.Sequential(nn.BatchNorm2d(3, momentum=0.3))))
    ours = model[0][0]
    assert isinstance(ours, GlobalBatchNorm)
    ours.load_state_dict(reference.state_dict())
    x, weights = global_bn_batch()
    for _ in range(2):  # two steps: running statistics and num_batches_tracked move the same way
        xr, xo = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        out_r, out_o = reference(xr), ours(xo)
        torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
        (out_r * weights).sum().backward()
        (out_o * weights).sum().backward()
        torch.testing.assert_close(xo.grad, xr.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name))
    reference.eval(), ours.eval()
    torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-5)


def test_conversion_keeps_the_tensors_and_names() -> None:
    model = build_resnet(18)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    convert_to_global_batch_norm(model)
    assert isinstance(model.layer2[0].downsample[1], GlobalBatchNorm)
    assert not any(type(m) is nn.BatchNorm2d for m in model.modules())
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(p is params[n] for n, p in model.named_parameters())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_global_batch_norm_over_two_ranks_is_one_process_over_the_global_batch(tmp_path) -> None:
    out = tmp_path / "bn.pt"
    torchrun(2, [str(REPO / "tests/dist_global_bn.py"), str(out)])
    ranks = torch.load(out)
    x, weights = global_bn_batch()
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.5]))
    x.requires_grad_(True)
    out_full = bn(x)
    (out_full * weights).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out_full.detach(), rtol=1e-5, atol=1e-5)
    # every rank's input gradient is that of the global loss; parameter gradients add up over ranks
    torch.testing.assert_close(torch.cat([r["grad"] for r in ranks]), x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sum(r["dweight"] for r in ranks), bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sum(r["dbias"] for r in ranks), bn.bias.grad, rtol=1e-4, atol=1e-4)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean)
        torch.testing.assert_close(r["running_var"], bn.running_var)
