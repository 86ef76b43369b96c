"""KL autoencoder (the latent-diffusion VAE): conv encoder/decoder with self-attention at the lowest
resolution and a diagonal-Gaussian latent.

Module names follow diffusers' `AutoencoderKL` (encoder/decoder.conv_in, down_blocks.N.resnets.M,
downsamplers.0.conv, mid_block.resnets/attentions, up_blocks..., conv_norm_out, conv_out,
quant_conv, post_quant_conv), so the state dict of a diffusers checkpoint loads by name
(`pretrain/models/vae_loading.py`). The layout is written here from that structure; no diffusers code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class VAEArch:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)  # one entry per resolution level
    layers_per_block: int = 2
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def level_channels(base: int, downsample: int) -> tuple[int, ...]:
    """base * min(2^i, 4) per level: SD's (128, 256, 512, 512) for base 128 and factor 8."""
    levels = downsample.bit_length()  # log2(downsample) + 1
    return tuple(base * min(2**i, 4) for i in range(levels))


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1x1 shortcut when the channel count changes."""

    def __init__(self, in_channels: int, out_channels: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialSelfAttention(nn.Module):
    """Single-head attention over all H*W positions (cheap only at the lowest resolution)."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        out = self.to_out[0](out).transpose(1, 2).reshape(batch, channels, height, width)
        return x + out


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups), ResnetBlock(channels, channels, groups)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if attention else [])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding right and bottom by one (halves even sides exactly)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 conv."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, downsample: bool) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels)] if downsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpBlock(DownBlock):
    def __init__(self, in_channels: int, out_channels: int, layers: int, groups: int, upsample: bool) -> None:
        super().__init__(in_channels, out_channels, layers, groups, downsample=False)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if upsample else [])

    def forward(self, x: Tensor) -> Tensor:
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


class Encoder(nn.Module):
    """Image -> 2 * latent_channels maps (posterior mean and log-variance) at 1/downsample resolution."""

    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        channels, groups = arch.block_out_channels, arch.norm_num_groups
        self.conv_in = nn.Conv2d(arch.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            DownBlock(
                channels[max(i - 1, 0)], channels[i], arch.layers_per_block, groups, downsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.mid_block = MidBlock(channels[-1], groups, arch.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], 2 * arch.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent -> image; up blocks run from the deepest level up and have one more resnet than down blocks."""

    def __init__(self, arch: VAEArch) -> None:
        super().__init__()
        channels, groups = tuple(reversed(arch.block_out_channels)), arch.norm_num_groups
        self.conv_in = nn.Conv2d(arch.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, arch.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(
                channels[max(i - 1, 0)], channels[i], arch.layers_per_block + 1, groups, upsample=i < len(channels) - 1
            )
            for i in range(len(channels))
        )
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(channels[-1], arch.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


@dataclass
class Posterior:
    """Diagonal Gaussian q(z | x)."""

    mean: Tensor
    logvar: Tensor

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, summed over latent elements."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1 - self.logvar).flatten(1).sum(dim=1)


class AutoencoderKL(nn.Module):
    """encode(x) -> Posterior over latents at 1/downsample resolution; decode(z) -> image. Inputs in [-1, 1]."""

    def __init__(self, arch: VAEArch = VAEArch()) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        self.decoder = Decoder(arch)
        latent2 = 2 * arch.latent_channels
        self.quant_conv = nn.Conv2d(latent2, latent2, 1) if arch.use_quant_conv else None
        self.post_quant_conv = (
            nn.Conv2d(arch.latent_channels, arch.latent_channels, 1) if arch.use_post_quant_conv else None
        )

    @property
    def downsample(self) -> int:
        return self.arch.downsample

    def encode(self, x: Tensor) -> Posterior:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return Posterior(mean, logvar.clamp(-30.0, 20.0))

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Posterior]:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator)), posterior


def vae_arch(
    in_channels: int = 3,
    latent_channels: int = 4,
    downsample: int = 8,
    base_channels: int = 128,
    layers_per_block: int = 2,
    norm_groups: int = 32,
    block_out_channels: Sequence[int] | None = None,
) -> VAEArch:
    """The conv layout the KL and VQ autoencoders share; level widths `block_out_channels`, else `level_channels`."""
    return VAEArch(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=latent_channels,
        block_out_channels=tuple(block_out_channels or level_channels(base_channels, downsample)),
        layers_per_block=layers_per_block,
        norm_num_groups=norm_groups,
    )


def build_vae(
    in_channels: int = 3,
    latent_channels: int = 4,
    downsample: int = 8,
    base_channels: int = 128,
    layers_per_block: int = 2,
    norm_groups: int = 32,
    block_out_channels: Sequence[int] | None = None,
) -> AutoencoderKL:
    return AutoencoderKL(
        vae_arch(
            in_channels, latent_channels, downsample, base_channels, layers_per_block, norm_groups, block_out_channels
        )
    )
