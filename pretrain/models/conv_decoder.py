"""An upsampling decoder from a CNN's feature map back to a dense output: the up-convolutions of Context
Encoders (Pathak et al. 2016) and the last stage of Zhang et al.'s colorization network.

`stages` times a 4x4 transposed convolution of stride 2 (padding 1, so the side exactly doubles), BatchNorm
and ReLU, then a 1x1 convolution to `out_channels` (pixels, or bin logits). The first up-convolution has
`width` channels and each further one half as many, at least `min_width`, so the cost stays with the coarse
stages. With `stages = 0` the decoder is the 1x1 convolution alone.
"""

from __future__ import annotations

from torch import Tensor, nn


def decoder_widths(width: int, stages: int, min_width: int = 32) -> list[int]:
    return [max(width >> i, min(min_width, width)) for i in range(stages)]


class UpsamplingDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, stages: int, width: int = 256, min_width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        inputs = in_channels
        for channels in decoder_widths(width, stages, min_width):
            layers += [
                nn.ConvTranspose2d(inputs, channels, 4, 2, 1, bias=False),
                nn.BatchNorm2d(channels),
                nn.ReLU(inplace=True),
            ]
            inputs = channels
        self.up = nn.Sequential(*layers)
        self.out = nn.Conv2d(inputs, out_channels, 1)
        self.stages, self.in_channels, self.out_channels = stages, in_channels, out_channels
        self.init_weights()

    def init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.ConvTranspose2d, nn.Conv2d)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
                module.reset_running_stats()
        self.out.reset_parameters()  # the output layer at torch's default: no ReLU follows it

    def forward(self, features: Tensor) -> Tensor:
        """[B, in_channels, h, w] -> [B, out_channels, h * 2^stages, w * 2^stages]."""
        return self.out(self.up(features))


def upsampling_decoder_flops(in_channels: int, out_channels: int, side: int, stages: int, width: int) -> float:
    """Forward multiply-adds x 2 of the decoder on a side x side feature map, as torch's FLOP counter counts
    convolutions (BatchNorm and ReLU are not counted)."""
    total, inputs = 0.0, in_channels
    for channels in decoder_widths(width, stages):
        total += 2.0 * side * side * inputs * channels * 16  # every input cell meets the 4x4 kernel once
        side, inputs = 2 * side, channels
    return total + 2.0 * side * side * inputs * out_channels
