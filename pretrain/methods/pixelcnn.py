"""PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders"): exact
likelihood of 8-bit images, one pixel and channel at a time, trained by teacher forcing in one pass
(pretrain/models/pixelcnn.py). The loss is the negative log-likelihood in nats per dimension; the metric
people compare is bits per dimension (the loss / ln 2; a uniform model scores 8).

Inputs are integer pixels: the train transform crops and flips a PIL image and keeps its 0..255 values
(one channel is the image's luminance, PIL's "L"), with no normalization, since the likelihood is over the
256 values themselves.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from pretrain.config import Config, ConfigError, bounded
from pretrain.diffusion.transforms import crop_and_flip
from pretrain.flops import FlopCount
from pretrain.methods.base import Method
from pretrain.methods.finetune import data_classes
from pretrain.methods.spec import MethodSpec
from pretrain.models.pixel_likelihood import bits_per_dim
from pretrain.models.pixelcnn import PixelCNN
from pretrain.visualize import image_grid


@dataclass
class PixelCNNConfig:
    """method.pixelcnn: the network and its likelihood. Images are data.image_size square."""

    # 1: gray (the image's luminance), 3: RGB, generated R -> G -> B within a pixel.
    channels: Literal[1, 3] = 3
    hidden_channels: int = bounded(128, gt=0)
    layers: int = bounded(15, ge=1)
    kernel_size: int = bounded(3, gt=0)
    first_kernel_size: int = bounded(7, gt=0)
    # categorical: a 256-way softmax per channel (the paper) | logistic_mixture: a discretized mixture of
    # n_mix logistics per channel (Salimans et al. 2017, PixelCNN++'s likelihood on this network).
    likelihood: Literal["categorical", "logistic_mixture"] = "categorical"
    n_mix: int = bounded(10, gt=0)
    # > 0: class-conditional on the data's labels (a learned bias per class in every gate); 0: unconditional.
    num_classes: int = bounded(0, ge=0)
    # Pictures: samples per class (conditional) or in all (unconditional), drawn every train.vis_every steps.
    vis_samples: int = bounded(8, ge=1)


def pixel_transform(
    size: int, channels: int, scale: tuple[float, float] = (1.0, 1.0), hflip: float = 0.0, train: bool = True
) -> Callable[[Image.Image, torch.Generator], Tensor]:
    """PIL image -> uint8 [channels, size, size], cropped and flipped as the other generative methods' images
    (`crop_and_flip`), its values kept."""
    geometry = crop_and_flip(size, scale, hflip, train)
    mode = "L" if channels == 1 else "RGB"

    def transform(image: Image.Image, gen: torch.Generator) -> Tensor:
        pixels = np.asarray(geometry(image, gen).convert(mode), dtype=np.uint8)
        return torch.from_numpy(pixels.copy()).reshape(size, size, channels).permute(2, 0, 1).contiguous()

    return transform


class PixelCNNMethod(Method):
    def __init__(self, model: PixelCNN, image_size: int, vis_samples: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.model = model
        self.image_size, self.vis_samples, self.seed = image_size, vis_samples, seed

    def init_weights(self) -> None:
        self.model.init_weights()

    def inference_network(self) -> PixelCNN:
        return self.model

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return []

    def _labels(self, batch: dict[str, Tensor]) -> Tensor | None:
        return batch["label"] if self.model.num_classes else None

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        x = batch["image"]
        if not isinstance(x, Tensor) or x.is_floating_point() or x.ndim != 4:
            raise ValueError("PixelCNN needs batch['image'] as integer pixels [B, C, H, W] (the pixelcnn transform)")
        nll = self.model.nll(self.model(x, self._labels(batch)), x)  # nats per image
        dims = x[0].numel()
        loss = nll.mean() / dims
        return {"loss": loss, "bits_per_dim": bits_per_dim(nll.detach().mean(), dims)}

    @torch.no_grad()
    def generate(self, labels: Tensor | None, num: int, generator: torch.Generator) -> Tensor:
        """uint8 [num, C, H, W] samples (of `labels`, for a conditional model)."""
        shape = (self.model.in_channels, self.image_size, self.image_size)
        return self.model.sample(num, labels, generator, shape).to(torch.uint8)

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """A grid of samples from a fixed seed: one row per class (the first 10) for a conditional model, so
        the same cells can be compared across steps."""
        device = batch["image"].device
        generator = torch.Generator(device=device).manual_seed(self.seed)
        rows = min(self.model.num_classes, 10) if self.model.num_classes else 1
        classes = torch.arange(rows, device=device).repeat_interleave(self.vis_samples)
        labels = classes if self.model.num_classes else None
        num = rows * self.vis_samples
        was_training = self.training
        self.eval()
        samples = self.generate(labels, num, generator)
        self.train(was_training)
        return {"samples": image_grid(samples.float().div(255), nrow=self.vis_samples)}


# ---------------------------------------------------------------------- the method's spec


def validate(cfg: Config) -> None:
    p = cfg.method.pixelcnn
    for key in ("kernel_size", "first_kernel_size"):
        if getattr(p, key) % 2 == 0:
            raise ConfigError(
                f"method.pixelcnn.{key}: must be odd (the masks keep the centre column), got {getattr(p, key)}"
            )
    if p.hidden_channels % p.channels:
        raise ConfigError(
            f"method.pixelcnn.hidden_channels: {p.hidden_channels} does not split into {p.channels} channel groups "
            "(one per image channel, so a channel sees the earlier channels of its pixel)"
        )


def preflight(cfg: Config) -> None:
    """A conditional model's classes cover the data's labels."""
    p = cfg.method.pixelcnn
    classes = data_classes(cfg.data.shards) if cfg.data.shards and p.num_classes else None
    if classes is not None and classes > p.num_classes:
        raise ConfigError(
            f"method.pixelcnn.num_classes: {p.num_classes} classes, the data at {cfg.data.shards} has {classes}"
        )


def build(cfg: Config) -> PixelCNNMethod:
    p = cfg.method.pixelcnn
    model = PixelCNN(
        in_channels=p.channels,
        hidden_channels=p.hidden_channels,
        layers=p.layers,
        kernel_size=p.kernel_size,
        first_kernel_size=p.first_kernel_size,
        num_classes=p.num_classes,
        likelihood=p.likelihood,
        n_mix=p.n_mix,
    )
    return PixelCNNMethod(model, cfg.data.image_size, p.vis_samples, cfg.run.seed)


def train_transform(cfg: Config):
    return pixel_transform(cfg.data.image_size, cfg.method.pixelcnn.channels, cfg.data.crop_scale, cfg.data.hflip)


def eval_transform(cfg: Config):
    """The whole image, resized: what `pretrain eval nll` scores."""
    return pixel_transform(cfg.data.image_size, cfg.method.pixelcnn.channels, train=False)


def flops(cfg: Config) -> FlopCount:
    """Every convolution at every pixel (all keep the image's size), with its whole kernel: the masks zero taps
    of dense kernels, which run in full. Per layer the vertical (k//2 + 1) x k and horizontal 1 x (k//2 + 1)
    convolutions to 2 x hidden gate channels, the 1x1 link, the 1x1 skip and (all but the last layer) the 1x1
    output; then the two 1x1 head layers."""
    p = cfg.method.pixelcnn
    pixels, hidden = cfg.data.image_size**2, p.hidden_channels

    def conv(cin: int, cout: int, kh: int = 1, kw: int = 1) -> float:
        return 2.0 * cin * cout * kh * kw * pixels

    total = 0.0
    for layer in range(p.layers):
        k = p.first_kernel_size if layer == 0 else p.kernel_size
        cin = p.channels if layer == 0 else hidden
        total += conv(cin, 2 * hidden, k // 2 + 1, k) + conv(cin, 2 * hidden, 1, k // 2 + 1)
        total += (
            conv(2 * hidden, 2 * hidden) + conv(hidden, hidden) + (conv(hidden, hidden) if layer < p.layers - 1 else 0)
        )
    outputs = 256 if p.likelihood == "categorical" else 3 * p.n_mix
    return FlopCount(total + conv(hidden, hidden) + conv(hidden, p.channels * outputs))


SPEC = MethodSpec(
    "pixelcnn", PixelCNNConfig, build, train_transform, validate=validate, preflight=preflight, flops=flops
)
