"""A compact StyleGAN2 (Karras et al. 2019, "A Style-Based Generator Architecture for GANs"; Karras et al. 2020,
"Analyzing and Improving the Image Quality of StyleGAN") generator and residual discriminator, for images in
[-1, 1].

Generator: z -> mapping MLP -> w; a learned 4x4 constant is refined by modulated 3x3 convolutions, two per
resolution (the first upsamples 2x), each followed by per-pixel noise, bias and leaky ReLU; a 1x1 ToRGB per
resolution adds to the upsampled RGB of the previous one (StyleGAN2's skip architecture). The styles of the
layers come from per-layer w's [B, num_ws, w_dim] (the same w repeated, unless style mixing), so `synthesis`
can take mixed ones.

Discriminator: StyleGAN2's residual architecture, the minibatch standard deviation at 4x4, and class
conditioning by projection (Miyato & Koyama 2018) instead of StyleGAN2-ADA's mapped-label projection.

Simplifications against the official code (same function class, plainer ops): 2x up/down-sampling is bilinear
interpolation / average pooling instead of stride-2 (transposed) convolutions with a [1, 3, 3, 1] FIR filter
(bilinear 2x upsampling is that filter, up to the border handling); no activation clamping, no fp16 paths.

Every linear map uses the equalized learning rate (StyleGAN's): weights are stored N(0, 1 / lr_multiplier^2)
and scaled at runtime by lr_multiplier * gain / sqrt(fan_in), so the effective init is N(0, gain^2 / fan_in)
whatever the multiplier, while Adam's steps on the effective weight shrink by lr_multiplier (0.01 in the
mapping network, as in the paper).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NOISE_MODES = ("random", "const", "none")
LRELU_GAIN = math.sqrt(2.0)


def lrelu(x: Tensor) -> Tensor:
    """Leaky ReLU(0.2) times sqrt(2), StyleGAN2's, which keeps activations' second moment about unit."""
    return F.leaky_relu(x, 0.2) * LRELU_GAIN


def normalize_2nd_moment(x: Tensor, eps: float = 1e-8) -> Tensor:
    """x / sqrt(mean of x^2 over features) ("pixel norm" of z): only z's direction matters to the mapping."""
    return x * torch.rsqrt(x.square().mean(dim=1, keepdim=True) + eps)


def upsample2x(x: Tensor) -> Tensor:
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def check_image_size(image_size: int) -> int:
    """log2(image_size), for a power of 2 >= 8."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of 2 >= 8, got {image_size}")
    return image_size.bit_length() - 1


def check_labels(num_classes: int, labels: Tensor | None, what: str) -> None:
    if num_classes and labels is None:
        raise ValueError(f"this {what} is class-conditional ({num_classes} classes): pass labels")
    if not num_classes and labels is not None:
        raise ValueError(f"this {what} is unconditional (num_classes=0): labels must be None")


class EqualLinear(nn.Module):
    """y = x W^T * (lr_multiplier / sqrt(in)) + b * lr_multiplier, with W stored N(0, 1 / lr_multiplier^2) and b
    stored as bias_init / lr_multiplier, so both start at their intended values (see the module docstring)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, bias_init: float = 0.0, lr_multiplier: float = 1.0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias_init, self.lr_multiplier = bias_init, lr_multiplier
        self.weight_gain = lr_multiplier / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=1.0 / self.lr_multiplier)
        if self.bias is not None:
            nn.init.constant_(self.bias, self.bias_init / self.lr_multiplier)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias * self.lr_multiplier
        return F.linear(x, self.weight * self.weight_gain, bias)


class EqualConv2d(nn.Module):
    """A stride-1, same-padded convolution with the equalized learning rate (weights N(0, 1) scaled by
    1 / sqrt(in_channels * k * k) at runtime)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__()
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.padding = kernel_size // 2
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight * self.weight_gain, self.bias, padding=self.padding)


class MappingNetwork(nn.Module):
    """z [B, latent_dim] (and labels [B]) -> w [B, w_dim]: 2nd-moment normalized z, concatenated with the
    normalized class embedding (StyleGAN2-ADA's conditional mapping; an embedding table equals its linear map
    of the one-hot label, bias aside), then `layers` fully connected layers with leaky ReLU.

    `w_avg` tracks the mean w (moving average, beta `w_avg_beta`) for the truncation trick; it is updated by
    forwards in training mode with update_w_avg=True. It is a buffer: a data-parallel wrapper that broadcasts
    buffers from one rank (DDP's default) keeps one rank's average.
    """

    def __init__(
        self,
        latent_dim: int,
        w_dim: int,
        layers: int = 8,
        num_classes: int = 0,
        lr_multiplier: float = 0.01,
        w_avg_beta: float = 0.995,
    ) -> None:
        super().__init__()
        if layers < 1:
            raise ValueError(f"mapping layers must be >= 1, got {layers}")
        self.latent_dim, self.w_dim, self.num_classes, self.w_avg_beta = latent_dim, w_dim, num_classes, w_avg_beta
        self.embed = nn.Embedding(num_classes, w_dim) if num_classes else None
        dims = [latent_dim + (w_dim if num_classes else 0)] + [w_dim] * layers
        self.layers = nn.ModuleList(
            EqualLinear(a, b, lr_multiplier=lr_multiplier) for a, b in zip(dims[:-1], dims[1:], strict=True)
        )
        self.register_buffer("w_avg", torch.zeros(w_dim))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        if self.embed is not None:
            nn.init.normal_(self.embed.weight)
        self.w_avg.zero_()

    def forward(self, z: Tensor, labels: Tensor | None = None, update_w_avg: bool = True) -> Tensor:
        check_labels(self.num_classes, labels, "mapping network")
        x = normalize_2nd_moment(z)
        if self.embed is not None:
            x = torch.cat([x, normalize_2nd_moment(self.embed(labels).to(x.dtype))], dim=1)
        for layer in self.layers:
            x = lrelu(layer(x))
        if self.training and update_w_avg:
            with torch.no_grad():
                self.w_avg.copy_(torch.lerp(x.detach().mean(dim=0).to(self.w_avg.dtype), self.w_avg, self.w_avg_beta))
        return x

    def truncate(self, w: Tensor, psi: float) -> Tensor:
        """w_avg + psi (w - w_avg) (the truncation trick; psi = 1: w itself, psi = 0: w_avg), for w [..., w_dim]."""
        if psi == 1:
            return w
        return torch.lerp(self.w_avg.to(w.dtype).expand_as(w), w, psi)


class ModulatedConv2d(nn.Module):
    """StyleGAN2's modulated convolution: the style s = affine(w) (bias init 1, so styles start near 1) scales
    the weight's input channels per sample, w'_oik = s_i w_oik, and demodulation rescales each output channel
    to unit norm, w'' = w' / sqrt(sum_ik w'^2 + 1e-8), so unit-variance inputs give unit-variance outputs and
    the style acts on relative, not absolute, channel scales (what removed StyleGAN's droplet artifacts).

    The per-sample weights run as one grouped convolution, the batch folded into the channel groups.
    `upsample`: bilinear 2x before the conv (StyleGAN2: a stride-2 transposed conv followed by a FIR filter).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        w_dim: int,
        demodulate: bool = True,
        upsample: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.demodulate, self.upsample = demodulate, upsample
        self.weight_gain = 1.0 / math.sqrt(in_channels * kernel_size**2)
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.affine.reset_parameters()
        nn.init.normal_(self.weight)

    def modulated_weight(self, styles: Tensor) -> Tensor:
        """Styles [B, in] -> per-sample weights [B, out, in, k, k]."""
        weight = self.weight.to(styles.dtype)[None] * self.weight_gain * styles[:, None, :, None, None]
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.square().sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        return weight

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        batch = x.shape[0]
        weight = self.modulated_weight(self.affine(w))
        if self.upsample:
            x = upsample2x(x)
        height, width = x.shape[-2:]
        out = F.conv2d(
            x.reshape(1, batch * self.in_channels, height, width),
            weight.reshape(batch * self.out_channels, self.in_channels, self.kernel_size, self.kernel_size),
            padding=self.kernel_size // 2,
            groups=batch,
        )
        return out.reshape(batch, self.out_channels, height, width)


class NoiseInjection(nn.Module):
    """x + strength[c] * noise[B, 1, H, W]: one noise image shared by the channels, scaled by a learned
    per-channel strength (StyleGAN's; StyleGAN2 uses one scalar a layer) that starts at 0, so a fresh
    network ignores noise.

    noise_mode "random" draws fresh noise (from `generator`, which must live on x's device, else from the
    global RNG), "const" uses this layer's fixed buffer (drawn at init, checkpointed), "none" adds nothing;
    an explicit `noise` wins over the mode.
    """

    def __init__(self, channels: int, resolution: int) -> None:
        super().__init__()
        self.strength = nn.Parameter(torch.empty(channels))
        self.register_buffer("noise_const", torch.empty(1, 1, resolution, resolution))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.strength)
        nn.init.normal_(self.noise_const)

    def forward(
        self,
        x: Tensor,
        noise_mode: str = "random",
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        if noise is None:
            if noise_mode == "none":
                return x
            if noise_mode == "const":
                noise = self.noise_const
            elif noise_mode == "random":
                shape = (x.shape[0], 1, *x.shape[2:])
                noise = torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
            else:
                raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        return x + self.strength.to(x.dtype)[None, :, None, None] * noise.to(x.dtype)


class SynthesisLayer(nn.Module):
    """Modulated 3x3 conv (optionally upsampling), noise, bias, leaky ReLU (StyleGAN2's order)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, upsample: bool) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, out_channels, 3, w_dim, upsample=upsample)
        self.noise = NoiseInjection(out_channels, resolution)
        self.bias = nn.Parameter(torch.zeros(out_channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.noise.reset_parameters()
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, w: Tensor, noise_mode: str, generator: torch.Generator | None) -> Tensor:
        x = self.noise(self.conv(x, w), noise_mode, generator)
        return lrelu(x + self.bias.to(x.dtype)[None, :, None, None])


class ToRGB(nn.Module):
    """1x1 modulated conv without demodulation, plus bias: the RGB contribution of one resolution."""

    def __init__(self, in_channels: int, channels: int, w_dim: int) -> None:
        super().__init__()
        self.conv = ModulatedConv2d(in_channels, channels, 1, w_dim, demodulate=False)
        self.bias = nn.Parameter(torch.zeros(channels))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        nn.init.zeros_(self.bias)

    def forward(self, x: Tensor, w: Tensor) -> Tensor:
        return self.conv(x, w) + self.bias.to(x.dtype)[None, :, None, None]


class SynthesisBlock(nn.Module):
    """One resolution: (the 4x4 constant, or an upsampling conv) + a conv + ToRGB added to the upsampled image.
    Uses num_conv + 1 consecutive w's; the ToRGB's w is the next block's first (StyleGAN2's indexing)."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, channels: int) -> None:
        super().__init__()
        first = resolution == 4
        self.const = nn.Parameter(torch.empty(out_channels, 4, 4)) if first else None
        self.conv0 = None if first else SynthesisLayer(in_channels, out_channels, w_dim, resolution, upsample=True)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, upsample=False)
        self.torgb = ToRGB(out_channels, channels, w_dim)
        self.num_conv = 1 if first else 2

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.const is not None:
            nn.init.normal_(self.const)
        for layer in self.conv0, self.conv1, self.torgb:
            if layer is not None:
                layer.reset_parameters()

    def forward(
        self, x: Tensor | None, img: Tensor | None, ws: Tensor, noise_mode: str, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        if self.conv0 is None:
            x = self.const.to(ws.dtype)[None].expand(ws.shape[0], -1, -1, -1)
            x = self.conv1(x, ws[:, 0], noise_mode, generator)
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, generator)
            x = self.conv1(x, ws[:, 1], noise_mode, generator)
        y = self.torgb(x, ws[:, self.num_conv])
        return x, y if img is None else upsample2x(img) + y


class StyleGANGenerator(nn.Module):
    """z [B, latent_dim] (and labels [B]) -> images [B, channels, image_size, image_size] (not squashed: StyleGAN
    outputs are unbounded and roughly in [-1, 1] once trained; clamp for display).

    Feature channels at resolution r: min(base_channels * image_size / r, max_channels), i.e. base_channels at
    full resolution, doubling per halving up to the cap (StyleGAN2's channel_base / r with
    channel_base = base_channels * image_size). num_ws = 2 log2(image_size) - 2 per-layer w's.
    """

    def __init__(
        self,
        latent_dim: int = 512,
        w_dim: int = 512,
        image_size: int = 64,
        channels: int = 3,
        base_channels: int = 128,
        max_channels: int = 512,
        mapping_layers: int = 8,
        num_classes: int = 0,
        mapping_lr_multiplier: float = 0.01,
    ) -> None:
        super().__init__()
        log2 = check_image_size(image_size)
        self.latent_dim, self.w_dim, self.image_size, self.channels = latent_dim, w_dim, image_size, channels
        self.num_classes = num_classes
        self.resolutions = [2**i for i in range(2, log2 + 1)]
        widths = {r: min(base_channels * image_size // r, max_channels) for r in self.resolutions}
        self.mapping = MappingNetwork(latent_dim, w_dim, mapping_layers, num_classes, mapping_lr_multiplier)
        self.blocks = nn.ModuleList(
            SynthesisBlock(widths[max(r // 2, 4)], widths[r], w_dim, r, channels) for r in self.resolutions
        )
        self.num_ws = sum(block.num_conv for block in self.blocks) + 1
        self.init_weights()

    def init_weights(self) -> None:
        """Equalized-lr weights N(0, 1) (mapping: N(0, 1 / lr_multiplier^2)), biases 0, style biases 1, noise
        strengths 0, fresh const noise, constant input N(0, 1), w_avg 0."""
        self.mapping.reset_parameters()
        for block in self.blocks:
            block.reset_parameters()

    def synthesis(self, ws: Tensor, noise_mode: str = "random", generator: torch.Generator | None = None) -> Tensor:
        """Per-layer w's [B, num_ws, w_dim] -> images."""
        if ws.ndim != 3 or ws.shape[1] != self.num_ws:
            raise ValueError(f"ws must be [B, {self.num_ws}, {self.w_dim}], got {list(ws.shape)}")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {NOISE_MODES}, got {noise_mode!r}")
        x = img = None
        index = 0
        for block in self.blocks:
            x, img = block(x, img, ws[:, index : index + block.num_conv + 1], noise_mode, generator)
            index += block.num_conv
        return img

    def mix_styles(self, ws: Tensor, labels: Tensor | None, prob: float, generator: torch.Generator | None) -> Tensor:
        """Style mixing regularization (StyleGAN): with probability `prob` (one draw for the batch), the w's from
        a random layer cutoff in [1, num_ws) on come from a second z. Tensor ops only, no host sync."""
        z2 = torch.randn(ws.shape[0], self.latent_dim, generator=generator, device=ws.device, dtype=ws.dtype)
        w2 = self.mapping(z2, labels, update_w_avg=False)
        cutoff = torch.randint(1, self.num_ws, (), generator=generator, device=ws.device)
        mixed = torch.rand((), generator=generator, device=ws.device) < prob
        cutoff = torch.where(mixed, cutoff, torch.full_like(cutoff, self.num_ws))
        second = torch.arange(self.num_ws, device=ws.device) >= cutoff
        return torch.where(second[None, :, None], w2[:, None], ws)

    def forward(
        self,
        z: Tensor,
        labels: Tensor | None = None,
        truncation_psi: float = 1.0,
        generator: torch.Generator | None = None,
        noise_mode: str = "random",
        return_w: bool = False,
        style_mixing_prob: float = 0.0,
        update_w_avg: bool = True,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """`generator` drives the noise and style mixing; `return_w` also returns the per-layer w's
        [B, num_ws, w_dim] that produced the images (after mixing and truncation)."""
        w = self.mapping(z, labels, update_w_avg=update_w_avg)
        ws = w[:, None].expand(-1, self.num_ws, -1)
        if style_mixing_prob > 0:
            ws = self.mix_styles(ws, labels, style_mixing_prob, generator)
        ws = self.mapping.truncate(ws, truncation_psi)
        images = self.synthesis(ws, noise_mode, generator)
        return (images, ws) if return_w else images


def minibatch_std(x: Tensor, group_size: int = 4, eps: float = 1e-8) -> Tensor:
    """Append one channel: per group of samples, the standard deviation of each feature over the group (population,
    sqrt(var + eps)), averaged over channels and pixels. Lets D see a batch's lack of variety (Karras et al. 2018).

    The group is min(group_size, B) samples; B must be a multiple of it. Groups are strided as in StyleGAN2:
    with n = B / G groups, sample b belongs to group b mod n.
    """
    batch, channels, height, width = x.shape
    group = min(group_size, batch)
    if batch % group:
        raise ValueError(f"minibatch std: batch size {batch} is not a multiple of the group size {group}")
    y = x.reshape(group, -1, channels, height, width)
    y = (y.var(dim=0, unbiased=False) + eps).sqrt().mean(dim=(1, 2, 3))  # [n]
    y = y.reshape(-1, 1, 1, 1).repeat(group, 1, height, width)
    return torch.cat([x, y], dim=1)


class DiscriminatorBlock(nn.Module):
    """StyleGAN2's residual block: (conv 3x3, conv 3x3 + 2x down) + (2x down, 1x1 conv), summed times
    1/sqrt(2) to keep the variance."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv0 = EqualConv2d(in_channels, in_channels, 3)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3)
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        skip = self.skip(F.avg_pool2d(x, 2))
        x = lrelu(self.conv0(x))
        x = lrelu(F.avg_pool2d(self.conv1(x), 2))
        return (x + skip) * math.sqrt(0.5)


class StyleGANDiscriminator(nn.Module):
    """images [B, channels, image_size, image_size] (and labels [B]) -> raw logits [B].

    fromRGB (1x1) -> residual blocks down to 4x4 -> minibatch std (group min(mbstd_group, B); B must be a
    multiple of it) -> conv 3x3 -> fully connected -> output. Conditional: logit += <embed(label), h> with h the
    fully connected features, the embedding equalized like every other weight (stored N(0, 1), times
    1/sqrt(dim)), so the projection term starts at the size of the unconditional output.
    Channels at resolution r as in the generator.
    """

    def __init__(
        self,
        image_size: int = 64,
        channels: int = 3,
        base_channels: int = 128,
        max_channels: int = 512,
        num_classes: int = 0,
        mbstd_group: int = 4,
    ) -> None:
        super().__init__()
        log2 = check_image_size(image_size)
        self.image_size, self.channels, self.num_classes, self.mbstd_group = (
            image_size,
            channels,
            num_classes,
            mbstd_group,
        )
        resolutions = [2**i for i in range(log2, 2, -1)]  # image_size .. 8
        width = {r: min(base_channels * image_size // r, max_channels) for r in [*resolutions, 4]}
        self.from_rgb = EqualConv2d(channels, width[image_size], 1)
        self.blocks = nn.ModuleList(DiscriminatorBlock(width[r], width[r // 2]) for r in resolutions)
        dim = width[4]
        self.feature_dim = dim
        self.conv = EqualConv2d(dim + 1, dim, 3)
        self.fc = EqualLinear(dim * 16, dim)
        self.out = EqualLinear(dim, 1)
        self.embed = nn.Embedding(num_classes, dim) if num_classes else None
        self.embed_gain = 1.0 / math.sqrt(dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Equalized-lr weights and the class embedding N(0, 1), biases 0."""
        for module in self.modules():
            if isinstance(module, EqualConv2d | EqualLinear):
                module.reset_parameters()
        if self.embed is not None:
            nn.init.normal_(self.embed.weight)

    def features(self, images: Tensor) -> Tensor:
        """[B, feature_dim]: what both the output layer and the projection read."""
        x = lrelu(self.from_rgb(images))
        for block in self.blocks:
            x = block(x)
        x = lrelu(self.conv(minibatch_std(x, self.mbstd_group)))
        return lrelu(self.fc(x.flatten(1)))

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        check_labels(self.num_classes, labels, "discriminator")
        h = self.features(images)
        logits = self.out(h).squeeze(1)
        if self.embed is not None:
            logits = logits + (self.embed(labels).to(h.dtype) * self.embed_gain * h).sum(dim=1)
        return logits
