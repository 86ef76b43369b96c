"""LPIPS perceptual distance (Zhang et al. 2018), VGG trunk, version 0.1, from local weight files only.

Nothing is downloaded at run time; the two files must already be on disk:

- the VGG16 ImageNet trunk: torchvision's checkpoint https://download.pytorch.org/models/vgg16-397923af.pth
  (only its `features.*` tensors are used; `classifier.*` is ignored);
- the LPIPS v0.1 linear layers: `lpips/weights/v0.1/vgg.pth` inside the `lpips` wheel
  (`pip download lpips --no-deps`, then unzip it), or the same path in github.com/richzhang/PerceptualSimilarity.

The arithmetic follows the released `lpips` 0.1.4 package, so scores are comparable with published ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

# (out channels per conv, in order) for torchvision's vgg16().features up to relu5_3; "M" is MaxPool2d(2, 2).
_VGG16_PLAN: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in that Sequential of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3: the five layers LPIPS compares.
VGG16_TAPS: tuple[int, ...] = (3, 8, 15, 22, 29)
LPIPS_CHANNELS: tuple[int, ...] = (64, 128, 256, 512, 512)
# The released ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
LPIPS_SHIFT: tuple[float, float, float] = (-0.030, -0.088, -0.188)
LPIPS_SCALE: tuple[float, float, float] = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` through index 29 with the same indices, so its checkpoint's
    `features.N.*` tensors load unchanged; the final pool (index 30) feeds nothing LPIPS uses."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for item in _VGG16_PLAN:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU()]
                channels = int(item)
        self.features = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in VGG16_TAPS:
                taps.append(x)
        return taps


def normalize_channels(x: Tensor) -> Tensor:
    """Unit length over channels at each position, eps outside the sqrt as released (matters only for
    near-zero features: with eps inside, features of norm 1e-12 would be divided by ~1e-5, not ~1e-10)."""
    return x / (x.pow(2).sum(dim=1, keepdim=True).sqrt() + LPIPS_EPS)


class LPIPS(nn.Module):
    """Distance between images in [-1, 1], shape [B, 1, 1, 1] as the release returns it (a spatial mean per
    layer, summed over the five layers). A single-channel input is repeated to RGB first: our addition, so
    gray digits can be scored; the release assumes 3 channels.

    A frozen metric: parameters never require grad and the module stays in eval mode even under a parent's
    `.train()` (it has no dropout or normalization, but a metric should not depend on the caller's mode).
    Gradients still flow to the inputs, so it can serve as a loss."""

    def __init__(self) -> None:
        super().__init__()
        # float32 like the release's torch.Tensor buffers, so `.double()` yields the same rounded constants.
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE, dtype=torch.float32).view(1, 3, 1, 1))
        self.net = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        return super().train(False)

    def _taps(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS expects [B, 1 or 3, H, W] images in [-1, 1], got shape {tuple(x.shape)}")
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.net((x - self.shift) / self.scale)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        total = 0
        for lin, a, b in zip(self.lins, self._taps(x), self._taps(y), strict=True):
            diff = (normalize_channels(a) - normalize_channels(b)).pow(2)
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


def _read_state(path: str | Path) -> Mapping[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights: no file {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"LPIPS weights: {path} holds a {type(state).__name__}, not a state dict")
    return state


def _copy(target: Tensor, state: Mapping[str, Tensor], key: str, path: str | Path) -> None:
    if key not in state:
        raise ValueError(f"LPIPS weights: {path} has no key {key!r}")
    value = state[key]
    if not isinstance(value, Tensor) or value.shape != target.shape:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"LPIPS weights: {path} key {key!r} is {shape}, expected {tuple(target.shape)}")
    with torch.no_grad():
        target.copy_(value)


def load_lpips(vgg_path: str | Path, lin_path: str | Path) -> LPIPS:
    """An LPIPS from torchvision's VGG16 checkpoint and the lpips v0.1 `vgg.pth`. Strict on what it needs
    (missing or misshapen tensors raise ValueError); keys it does not need (`classifier.*`) are ignored."""
    model = LPIPS()
    vgg_state = _read_state(vgg_path)
    lin_state = _read_state(lin_path)
    for name, tensor in model.net.features.state_dict(keep_vars=True).items():
        _copy(tensor, vgg_state, f"features.{name}", vgg_path)
    for index, lin in enumerate(model.lins):
        _copy(lin.weight, lin_state, f"lin{index}.model.1.weight", lin_path)
    return model
