"""LPIPS (VGG, v0.1) against the released `lpips` 0.1.4 code on identical weights, plus the local-file loader.

The released package imports torchvision for its trunk; torchvision is not installed here (it would replace the
pinned torch), so the agreement test hands it a stub `torchvision.models.vgg16` whose `.features` carries the
same random weights as ours. CI installs the package without dependencies: `pip install --no-deps lpips==0.1.4`.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from pretrain.models.lpips import LPIPS, load_lpips, normalize_channels

pytestmark = pytest.mark.usefixtures("one_thread")

LIN_CHANNELS = (64, 128, 256, 512, 512)


def torchvision_vgg16_features() -> nn.Sequential:
    """torchvision's `vgg16().features`, written out independently of ours (in-place ReLUs, final pool)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"):
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = item
    return nn.Sequential(*layers)


def torchvision_checkpoint(features: nn.Sequential) -> dict[str, Tensor]:
    """The layout of vgg16-397923af.pth: `features.N.*` plus classifier tensors the loader must skip."""
    state = {f"features.{k}": v.clone() for k, v in features.state_dict().items()}
    state["classifier.0.weight"] = torch.randn(8, 16)
    state["classifier.0.bias"] = torch.randn(8)
    state["classifier.6.weight"] = torch.randn(4, 8)
    return state


def lin_checkpoint() -> dict[str, Tensor]:
    """The layout of lpips/weights/v0.1/vgg.pth, with positive weights as the released ones are."""
    return {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) + 0.01 for i, c in enumerate(LIN_CHANNELS)}


@pytest.fixture(scope="module")
def features() -> nn.Sequential:
    torch.manual_seed(0)
    return torchvision_vgg16_features()


@pytest.fixture(scope="module")
def weight_files(features: nn.Sequential, module_tmp) -> tuple[Path, Path]:
    folder = module_tmp("lpips-weights")
    torch.manual_seed(1)
    torch.save(torchvision_checkpoint(features), folder / "vgg16-397923af.pth")
    torch.save(lin_checkpoint(), folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


@pytest.fixture
def released_lpips(features: nn.Sequential, monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The installed `lpips`, imported afresh against a stub torchvision and removed again afterwards, so no
    other test sees a package bound to the stub."""
    models = types.ModuleType("torchvision.models")

    def vgg16(pretrained: bool = False, **kwargs: object) -> types.SimpleNamespace:
        assert not pretrained, "with pnet_rand=True the release must not ask for ImageNet weights"
        return types.SimpleNamespace(features=copy.deepcopy(features))

    models.vgg16 = vgg16
    package = types.ModuleType("torchvision")
    package.models = models
    monkeypatch.setitem(sys.modules, "torchvision", package)
    monkeypatch.setitem(sys.modules, "torchvision.models", models)

    def ours(name: str) -> bool:
        return name == "lpips" or name.startswith("lpips.")

    saved = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in saved:
        del sys.modules[name]
    try:
        # Skip only when the package is absent: an import error inside it (e.g. a wrong stub) must fail.
        if importlib.util.find_spec("lpips") is None:
            pytest.skip("lpips is not installed (pip install --no-deps lpips==0.1.4)")
        import lpips

        yield lpips
    finally:
        for name in [name for name in sys.modules if ours(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


def test_matches_released_lpips(released_lpips: types.ModuleType, weight_files: tuple[Path, Path]) -> None:
    """Same trunk, the package's own shipped v0.1 linear weights: same distances and input gradients."""
    shipped_lins = Path(released_lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    reference = released_lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False)
    ours = load_lpips(weight_files[0], shipped_lins)
    reference.double()
    ours.double()
    for i, lin in enumerate(ours.lins):
        torch.testing.assert_close(lin.weight, reference.lins[i].model[1].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.shift, reference.scaling_layer.shift, rtol=0, atol=0)
    torch.testing.assert_close(ours.scale, reference.scaling_layer.scale, rtol=0, atol=0)

    generator = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 32, 32, generator=generator, dtype=torch.float64) * 2 - 1
    y = (x + 0.5 * torch.randn(x.shape, generator=generator, dtype=torch.float64)).clamp(-1, 1)
    x_ours, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    d_ours, d_ref = ours(x_ours, y), reference(x_ref, y)
    assert d_ours.shape == d_ref.shape == (3, 1, 1, 1)
    torch.testing.assert_close(d_ours, d_ref, rtol=1e-10, atol=1e-12)
    assert (d_ref > 0).all()
    d_ours.sum().backward()
    d_ref.sum().backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-9, atol=1e-12)
    assert x_ref.grad.abs().sum() > 0


def test_normalization_matches_released(released_lpips: types.ModuleType) -> None:
    """Where the eps sits only shows on near-zero features, which random trunks do not produce."""
    features = torch.randn(2, 8, 3, 3, dtype=torch.float64)
    features[0] *= 1e-12
    features[1, :, 0, 0] = 0
    torch.testing.assert_close(
        normalize_channels(features), released_lpips.normalize_tensor(features), rtol=1e-12, atol=0
    )


def test_load_from_files(weight_files: tuple[Path, Path]) -> None:
    vgg_path, lin_path = weight_files
    model = load_lpips(vgg_path, lin_path)
    vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
    lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
    loaded = {f"features.{k}": v for k, v in model.net.features.state_dict().items()}
    assert set(loaded) == {k for k in vgg_state if k.startswith("features.")}
    assert len(loaded) == 26
    for key, value in loaded.items():
        torch.testing.assert_close(value, vgg_state[key], rtol=0, atol=0)
    for i, lin in enumerate(model.lins):
        torch.testing.assert_close(lin.weight, lin_state[f"lin{i}.model.1.weight"], rtol=0, atol=0)

    generator = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    y = torch.rand(2, 3, 16, 16, generator=generator) * 2 - 1
    with torch.no_grad():
        assert (model(x, x) == 0).all()
        assert (model(x, y) > 0).all()


def test_loader_errors(weight_files: tuple[Path, Path], tmp_path: Path) -> None:
    vgg_path, lin_path = weight_files
    missing = tmp_path / "nowhere" / "vgg.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lpips(vgg_path, missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_lpips(missing, lin_path)

    lins = lin_checkpoint()
    del lins["lin3.model.1.weight"]
    lacking = tmp_path / "lacking.pth"
    torch.save(lins, lacking)
    with pytest.raises(ValueError, match=r"lin3\.model\.1\.weight") as raised:
        load_lpips(vgg_path, lacking)
    assert str(lacking) in str(raised.value)

    lins = lin_checkpoint()
    lins["lin2.model.1.weight"] = torch.rand(1, 128, 1, 1)
    misshapen = tmp_path / "misshapen.pth"
    torch.save(lins, misshapen)
    with pytest.raises(ValueError, match=r"lin2\.model\.1\.weight"):
        load_lpips(vgg_path, misshapen)

    trunk = {k: v for k, v in torch.load(vgg_path, weights_only=True).items() if k != "features.28.bias"}
    truncated = tmp_path / "truncated.pth"
    torch.save(trunk, truncated)
    with pytest.raises(ValueError, match=r"features\.28\.bias"):
        load_lpips(truncated, lin_path)


def test_frozen_but_differentiable_in_input() -> None:
    torch.manual_seed(4)
    model = LPIPS()
    assert not any(p.requires_grad for p in model.parameters())
    model.train()
    assert not model.training and not any(m.training for m in model.modules())
    x = (torch.rand(1, 3, 16, 16) * 2 - 1).requires_grad_(True)
    y = torch.rand(1, 3, 16, 16) * 2 - 1
    model(x, y).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_gray_is_repeated_to_rgb() -> None:
    torch.manual_seed(5)
    model = LPIPS()
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    y = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        gray = model(x, y)
        rgb = model(x.repeat(1, 3, 1, 1), y.repeat(1, 3, 1, 1))
    torch.testing.assert_close(gray, rgb, rtol=0, atol=0)
    with pytest.raises(ValueError, match="1 or 3"):
        model(torch.zeros(1, 2, 16, 16), torch.zeros(1, 2, 16, 16))
