"""ResNet-18 and ResNet-50 (He et al. 2016) in torchvision's parameter layout, so weights map by name.

conv1, bn1, (maxpool), layer1..layer4 of BasicBlocks (18) or Bottlenecks (50), each block's
`downsample` a 1x1 conv + BN where the shape changes, global average pooling and `fc`. With
`num_classes=0` there is no `fc`: the encoder of the self-supervised methods, whose pooled feature is
`forward_features`.

The `small` stem is the CIFAR convention of the SimCLR paper's appendix (B.9): the 7x7 stride-2 conv
becomes a 3x3 stride-1 conv and the max-pool is removed, for 32 x 32 (and digit-sized) inputs.

Plain modules: BatchNorm is torch's `nn.BatchNorm2d`; the engines make its batch statistics global
(pretrain/models/global_bn.py), the model knows nothing of ranks. `norm="layer"` puts a layer norm in every
BN's place (CPC v2, Henaff et al. 2019, section 4.1: batch statistics tie the patches of an image together
and let CPC cheat): `nn.GroupNorm` with one group, normalizing each sample over channels and space, with a
per-channel scale and shift, under the same names (bn1, downsample.1, ...).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from pretrain.config import ResNetNorm, ResNetStem

# depth -> (block kind, blocks per stage)
RESNET_DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
STAGE_WIDTHS = (64, 128, 256, 512)


def norm_layer(channels: int, norm: ResNetNorm = "batch") -> nn.Module:
    """What sits where torchvision has a BatchNorm2d: that, or a layer norm over (C, H, W) of each sample."""
    return nn.BatchNorm2d(channels) if norm == "batch" else nn.GroupNorm(1, channels)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: ResNetNorm = "batch") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes, norm)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes, norm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride, norm)

    def last_bn(self) -> nn.Module:
        return self.bn2

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, norm: ResNetNorm = "batch") -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(in_planes, width, 1, bias=False)
        self.bn1 = norm_layer(width, norm)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = norm_layer(width, norm)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = norm_layer(planes * self.expansion, norm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(in_planes, planes * self.expansion, stride, norm)

    def last_bn(self) -> nn.Module:
        return self.bn3

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _downsample(in_planes: int, out_planes: int, stride: int, norm: ResNetNorm = "batch") -> nn.Sequential | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), norm_layer(out_planes, norm))


class ResNet(nn.Module):
    def __init__(
        self,
        depth: int = 50,
        num_classes: int = 0,
        in_chans: int = 3,
        stem: ResNetStem = "imagenet",
        zero_init_residual: bool = False,
        norm: ResNetNorm = "batch",
    ) -> None:
        super().__init__()
        if depth not in RESNET_DEPTHS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(RESNET_DEPTHS)}")
        if stem not in ("imagenet", "small"):
            raise ValueError(f"ResNet stem {stem!r} is not 'imagenet' or 'small'")
        if norm not in ("batch", "layer"):
            raise ValueError(f"ResNet norm {norm!r} is not 'batch' or 'layer'")
        kind, counts = RESNET_DEPTHS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.depth, self.stem, self.zero_init_residual = depth, stem, zero_init_residual
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(in_chans, 64, 7, 2, 3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, 2, 1)
        else:
            self.conv1 = nn.Conv2d(in_chans, 64, 3, 1, 1, bias=False)
            self.maxpool = nn.Identity()
        self.bn1 = norm_layer(64, norm)
        self.relu = nn.ReLU(inplace=True)
        in_planes = 64
        for index, (planes, count) in enumerate(zip(STAGE_WIDTHS, counts)):
            blocks = []
            for b in range(count):
                stride = 2 if index > 0 and b == 0 else 1
                blocks.append(block(in_planes, planes, stride, norm))
                in_planes = planes * block.expansion
            # nn.Sequential keeps torchvision's names (layer1.0.conv1) and is a ModuleList the engines can wrap.
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
        self.embed_dim = in_planes
        self.fc = nn.Linear(in_planes, num_classes) if num_classes > 0 else None
        self.init_weights()

    def stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    @torch.no_grad()
    def init_weights(self) -> None:
        """torchvision's init: Kaiming-normal (fan out) convs, BN at identity, nn.Linear's default for fc;
        `zero_init_residual` starts each block's last BN at zero (Goyal et al. 2017)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()
            elif isinstance(module, nn.GroupNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                module.reset_parameters()
        if self.zero_init_residual:
            for stage in self.stages():
                for block in stage:
                    nn.init.zeros_(block.last_bn().weight)

    def published_parameter_count(self, num_classes: int = 1000) -> int:
        """Parameters as published (torchvision, the papers): with a `num_classes` head, whether or not this
        encoder has one (ResNet-50: 25,557,032; ResNet-18: 11,689,512)."""
        body = sum(p.numel() for name, p in self.named_parameters() if not name.startswith("fc."))
        return body + self.embed_dim * num_classes + num_classes

    def forward_features(self, x: Tensor, pool: str = "mean") -> Tensor:
        """The globally average-pooled output of the last stage [B, embed_dim]: a ResNet's only pooled feature."""
        if pool != "mean":
            raise ValueError(f"a ResNet's pooled feature is the global average (pool='mean'), got pool={pool!r}")
        return torch.flatten(self.forward_feature_map(x).mean(dim=(2, 3)), 1)

    @property
    def stride(self) -> int:
        """The feature map's downsampling: 32 with the ImageNet stem, 8 with the small one."""
        return 32 if self.stem == "imagenet" else 8

    @property
    def in_chans(self) -> int:
        return self.conv1.in_channels

    def forward_feature_map(self, x: Tensor) -> Tensor:
        """The last stage's output before pooling [B, embed_dim, H / stride, W / stride]: what dense heads
        (inpainting's decoder, colorization's upsampling head) read."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in self.stages():
            x = stage(x)
        return x

    def forward(self, x: Tensor) -> Tensor:
        features = self.forward_features(x)
        return self.fc(features) if self.fc is not None else features


def build_resnet(
    depth: int,
    num_classes: int = 0,
    in_chans: int = 3,
    stem: ResNetStem = "imagenet",
    zero_init_residual: bool = False,
    norm: ResNetNorm = "batch",
) -> ResNet:
    return ResNet(depth, num_classes, in_chans, stem, zero_init_residual, norm)
