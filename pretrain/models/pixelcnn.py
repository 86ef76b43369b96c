"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"): an
autoregressive model of 8-bit images, p(x) = product over pixels in raster order, and within a pixel over
channels in order (R -> G -> B).

Causality is built into the convolutions, so training is one teacher-forced forward pass:
- The vertical stack covers the rows above. Its features at row r see input rows <= r (a k x k kernel cut to
  its upper k // 2 + 1 rows) and reach the horizontal stack only through a 1x1 link shifted down one row,
  so through it the horizontal stack at row r sees rows < r, every channel of them.
- The horizontal stack covers the current row up to the current pixel (a 1 x (k // 2 + 1) kernel that ends
  at the current column). Its channels, like the output's, are split into C contiguous groups, one per image
  channel; group c at pixel p may see input channels < c at p (mask "A", first layer) or hidden groups <= c
  at p (mask "B", every later conv incl. the 1x1 ones), and everything at earlier pixels.
  So output group c at p depends on input channels < c at p and on every channel of earlier pixels.
- Two stacks instead of one masked k x k conv: no blind spot. The last layer sees the `receptive_field`
  (E) pixels left of p in its row, and the rectangle of the E + 1 rows above spanning E columns either side.

Each layer gates tanh(W_f x + V_f y) * sigmoid(W_g x + V_g y), with V y a learned per-class bias on the gate
pre-activations (`num_classes = 0`: unconditional). The horizontal stack is residual after the first layer;
every layer sends a skip connection to a two-layer 1x1 head (ELU, masked conv, ELU, masked conv). ELU, not the
paper's ReLU: a channel group's few head units can all be dead ReLUs (seen at init with 8 units a group), which
silently cuts that channel's dependence on the earlier channels of its pixel.

`forward` returns [B, C, K, H, W] (see pixel_likelihood): 256 logits per channel, or a discretized logistic
mixture. Deliberately, the mixture of channel c comes from output group c, which already sees channels < c of
the pixel, instead of PixelCNN++'s linear coefficients that shift later channels' means by earlier values:
the network carries the channel order for both heads alike, and the dependence need not be linear.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.pixel_likelihood import (
    PIXEL_LEVELS,
    categorical_nll,
    logistic_mixture_nll,
    sample_categorical,
    sample_logistic_mixture,
    scale_pixels,
)

LIKELIHOODS = ("categorical", "logistic_mixture")


def channel_group_mask(out_channels: int, in_channels: int, groups: int, mask_type: str) -> Tensor:
    """[out, in] bool: output group g may use input group h at the current pixel iff h < g (A) or h <= g (B);
    channels are split into `groups` contiguous, equal blocks."""
    out_group = torch.arange(out_channels) * groups // out_channels
    in_group = torch.arange(in_channels) * groups // in_channels
    if mask_type == "A":
        return in_group[None, :] < out_group[:, None]
    return in_group[None, :] <= out_group[:, None]


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only what precedes the current pixel in raster order, plus, at the pixel
    itself, the earlier channel groups (mask "A") or the earlier and own group (mask "B").

    The current pixel is kernel tap `center` (default: the middle); padding puts it over the output pixel,
    so a 1 x k kernel with center (0, k - 1) is a causal row convolution without wasted taps.
    `channel_groups` is the image channel count (nn.Conv2d's own `groups` stays 1).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        mask_type: str,
        channel_groups: int = 1,
        center: tuple[int, int] | None = None,
        bias: bool = True,
    ) -> None:
        if mask_type not in ("A", "B"):
            raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
        if in_channels % channel_groups or out_channels % channel_groups:
            raise ValueError(f"channels {in_channels} -> {out_channels} do not split into {channel_groups} groups")
        super().__init__(in_channels, out_channels, kernel_size, bias=bias)
        kh, kw = self.kernel_size
        self.center = center if center is not None else (kh // 2, kw // 2)
        if not (0 <= self.center[0] < kh and 0 <= self.center[1] < kw):
            raise ValueError(f"center {self.center} outside the {kh}x{kw} kernel")
        self.mask_type, self.channel_groups = mask_type, channel_groups
        ci, cj = self.center
        self.pads = (cj, kw - 1 - cj, ci, kh - 1 - ci)  # F.pad order: left, right, top, bottom
        self.register_buffer("mask", torch.empty_like(self.weight), persistent=False)
        self.reset_mask()

    @torch.no_grad()
    def reset_mask(self) -> None:
        """Recomputed, never checkpointed (engines that build on the meta device call init_weights)."""
        ci, cj = self.center
        self.mask.zero_()
        self.mask[:, :, :ci] = 1
        self.mask[:, :, ci, :cj] = 1
        groups = channel_group_mask(self.out_channels, self.in_channels, self.channel_groups, self.mask_type)
        self.mask[:, :, ci, cj] = groups.to(self.mask.dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(F.pad(x, self.pads), self.weight * self.mask, self.bias)


def gate(pre: Tensor, groups: int) -> Tensor:
    """tanh(f) * sigmoid(g) on pre-activations laid out as [groups, (f, g), C / groups], so a channel and its
    gate share a channel group and the result keeps contiguous groups."""
    f, g = pre.unflatten(1, (groups, 2, -1)).unbind(2)
    return (torch.tanh(f) * torch.sigmoid(g)).flatten(1, 2)


class GatedLayer(nn.Module):
    """One layer of both stacks. The first takes the image (mask A, no residual); the last has no output
    conv, since only its skip is used (every parameter gets a gradient, as DDP wants)."""

    def __init__(
        self, in_channels: int, hidden: int, kernel_size: int, groups: int, num_classes: int, first: bool, last: bool
    ) -> None:
        super().__init__()
        half = kernel_size // 2
        self.groups, self.half, self.first = groups, half, first
        self.vertical = nn.Conv2d(in_channels, 2 * hidden, (half + 1, kernel_size))
        self.link = nn.Conv2d(2 * hidden, 2 * hidden, 1)  # sees rows above only: no channel mask needed
        self.horizontal = MaskedConv2d(
            in_channels, 2 * hidden, (1, half + 1), "A" if first else "B", groups, center=(0, half)
        )
        self.skip = MaskedConv2d(hidden, hidden, 1, "B", groups)
        self.out = None if last else MaskedConv2d(hidden, hidden, 1, "B", groups)
        self.class_bias = nn.Embedding(num_classes, 4 * hidden) if num_classes else None

    def biases(self, labels: Tensor | None) -> tuple[Tensor | float, Tensor | float]:
        if self.class_bias is None:
            return 0.0, 0.0
        vertical, horizontal = self.class_bias(labels)[:, :, None, None].chunk(2, dim=1)
        return vertical, horizontal

    def vertical_step(self, v: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor]:
        """-> (next vertical features, link into the horizontal stack). Row r of the link comes from row r - 1
        of the vertical pre-activations (the top row from a zero row)."""
        pre = self.vertical(F.pad(v, (self.half, self.half, self.half, 0))) + self.biases(labels)[0]
        link = self.link(F.pad(pre, (0, 0, 1, 0))[:, :, :-1])
        return gate(pre, self.groups), link

    def horizontal_step(self, h: Tensor, link: Tensor, labels: Tensor | None) -> tuple[Tensor | None, Tensor]:
        """-> (next horizontal features, or None after the last layer; skip contribution)."""
        gated = gate(self.horizontal(h) + link + self.biases(labels)[1], self.groups)
        if self.out is None:
            return None, self.skip(gated)
        out = self.out(gated)
        return (out if self.first else h + out), self.skip(gated)


class PixelCNN(nn.Module):
    """Gated PixelCNN over C-channel 8-bit images; `forward(x, labels)` maps integer pixels [B, C, H, W]
    to the likelihood's parameters [B, C, K, H, W]. `first_kernel_size` is the first layer's (the paper
    uses 7), `kernel_size` every later one's; both odd."""

    def __init__(
        self,
        in_channels: int = 3,
        hidden_channels: int = 128,
        layers: int = 15,
        kernel_size: int = 3,
        first_kernel_size: int = 7,
        num_classes: int = 0,
        likelihood: str = "categorical",
        n_mix: int = 10,
    ) -> None:
        super().__init__()
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if kernel_size % 2 == 0 or first_kernel_size % 2 == 0:
            raise ValueError(f"kernel sizes must be odd, got {first_kernel_size} and {kernel_size}")
        if hidden_channels % in_channels:
            raise ValueError(f"hidden_channels={hidden_channels} must split into {in_channels} channel groups")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.in_channels, self.hidden_channels, self.num_classes = in_channels, hidden_channels, num_classes
        self.likelihood, self.n_mix = likelihood, n_mix
        self.params_per_channel = PIXEL_LEVELS if likelihood == "categorical" else 3 * n_mix
        self.receptive_field = first_kernel_size // 2 + (layers - 1) * (kernel_size // 2)
        self.layers = nn.ModuleList(
            GatedLayer(
                in_channels if i == 0 else hidden_channels,
                hidden_channels,
                first_kernel_size if i == 0 else kernel_size,
                in_channels,
                num_classes,
                first=i == 0,
                last=i == layers - 1,
            )
            for i in range(layers)
        )
        self.head_hidden = MaskedConv2d(hidden_channels, hidden_channels, 1, "B", in_channels)
        self.head_out = MaskedConv2d(hidden_channels, in_channels * self.params_per_channel, 1, "B", in_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """torch's default conv init, N(0, 0.02) class biases, and the masks (buffers are not checkpointed)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                module.reset_parameters()
            if isinstance(module, MaskedConv2d):
                module.reset_mask()
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)

    def _check_labels(self, labels: Tensor | None) -> None:
        if self.num_classes and labels is None:
            raise ValueError(f"this PixelCNN is class-conditional ({self.num_classes} classes): pass labels")
        if not self.num_classes and labels is not None:
            raise ValueError("this PixelCNN is unconditional (num_classes=0): labels must be None")

    def _scale(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            raise TypeError("PixelCNN takes integer pixels 0..255 (long or uint8); use forward_scaled for floats")
        return scale_pixels(x, self.head_out.weight.dtype)

    def vertical_links(self, x: Tensor, labels: Tensor | None) -> list[Tensor]:
        """Scaled pixels [B, C, h, W] -> per layer, the link into the horizontal stack; row r depends on
        input rows < r only."""
        links, v = [], x
        for layer in self.layers:
            v, link = layer.vertical_step(v, labels)
            links.append(link)
        return links

    def horizontal_head(self, x: Tensor, links: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        """Scaled pixels and links over the same rows and columns -> output [B, C, K, h, w]. Row by row and
        causal along the row: column j depends on input and links at columns <= j of its own row only."""
        h, skip = x, 0.0
        for layer, link in zip(self.layers, links, strict=True):
            h, contribution = layer.horizontal_step(h, link, labels)
            skip = skip + contribution
        out = self.head_out(F.elu(self.head_hidden(F.elu(skip))))
        return out.unflatten(1, (self.in_channels, self.params_per_channel))

    def forward_scaled(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Float input already in [-1, 1] (what tests differentiate through) -> [B, C, K, H, W]."""
        self._check_labels(labels)
        return self.horizontal_head(x, self.vertical_links(x, labels), labels)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Integer pixels [B, C, H, W] (0..255) and class labels [B] (conditional models) -> [B, C, K, H, W]."""
        return self.forward_scaled(self._scale(x), labels)

    def nll(self, output: Tensor, x: Tensor) -> Tensor:
        """Per-image negative log-likelihood in nats, [B], of pixels x under this model's `forward` output."""
        if self.likelihood == "categorical":
            return categorical_nll(output, x)
        return logistic_mixture_nll(output, x, self.n_mix)

    def sample_pixels(self, output: Tensor, generator: torch.Generator | None) -> Tensor:
        """Draw integer pixels [B, C, h, w] from an output [B, C, K, h, w]."""
        if self.likelihood == "categorical":
            return sample_categorical(output, generator)
        return sample_logistic_mixture(output, self.n_mix, generator)

    @torch.no_grad()
    def sample(
        self,
        num: int,
        labels: Tensor | None = None,
        generator: torch.Generator | None = None,
        shape: tuple[int, int, int] | None = None,
    ) -> Tensor:
        """`num` images [num, C, H, W] (int64, 0..255) drawn pixel by pixel in raster order, channel by channel,
        all randomness from `generator` (on the model's device).

        Work is reused between positions, and the result is exactly that of recomputing the full image at
        every position (the test compares sample for sample): every output of row r depends on rows <= r only,
        so nothing below row r is ever computed. Further, only its horizontal part depends on row r itself:
        the vertical stack runs once per row, on the receptive_field + 2 rows that can reach it, and each
        pixel and channel then reruns only the horizontal stack and the head, on the current row cut to the
        receptive_field + 1 columns that can reach the pixel.
        """
        if shape is None:
            raise ValueError("pass shape=(C, H, W): the network is convolutional and fixes no image size")
        channels, height, width = shape
        if channels != self.in_channels:
            raise ValueError(f"shape has {channels} channels, the model {self.in_channels}")
        self._check_labels(labels)
        x = torch.zeros(num, channels, height, width, dtype=torch.long, device=self.head_out.weight.device)
        for row in range(height):
            links = self.row_links(x, row, labels)
            for col in range(width):
                for channel in range(channels):
                    output = self.pixel_output(x, row, col, links, labels)
                    x[:, channel, row, col] = self.sample_pixels(output, generator)[:, channel, 0, 0]
        return x

    def row_links(self, x: Tensor, row: int, labels: Tensor | None) -> list[Tensor]:
        """The vertical stack's links into row `row` of integer pixels x, [B, 2 * hidden, 1, W] per layer,
        from the receptive_field + 1 rows above it (the row itself is computed over but does not count)."""
        top = max(0, row - self.receptive_field - 1)
        return [link[:, :, -1:] for link in self.vertical_links(self._scale(x[:, :, top : row + 1]), labels)]

    def pixel_output(self, x: Tensor, row: int, col: int, links: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        """The output at one pixel, [B, C, K, 1, 1], from `row_links(x, row)` and the row's pixels left of it
        within the receptive field (and its earlier channels)."""
        left = max(0, col - self.receptive_field)
        window = self._scale(x[:, :, row : row + 1, left : col + 1])
        return self.horizontal_head(window, [link[..., left : col + 1] for link in links], labels)[..., -1:]
