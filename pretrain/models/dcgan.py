"""DCGAN (Radford et al. 2016, "Unsupervised Representation Learning with Deep Convolutional Generative
Adversarial Networks"): an all-convolutional generator and discriminator with BatchNorm, for images in [-1, 1].

Both networks scale with the image: between the 4x4 map and the image there are log2(image_size) - 2
stride-2 (de)convolutions, channels halving towards the image (base_channels at the largest hidden map).
Convolutions followed by BatchNorm have no bias (BatchNorm's shift would cancel it and leave it without
a gradient); the others (D's first and last, G's last) keep one.

DCGAN is unconditional; `num_classes > 0` adds class conditioning the way later GANs do it: the generator
concatenates a learned label embedding to z, and the discriminator adds a projection term (Miyato & Koyama
2018, "cGANs with Projection Discriminator").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

INIT_STD = 0.02  # the paper: "All weights were initialized from a zero-centered Normal distribution with std 0.02"


def resolution_levels(image_size: int) -> int:
    """Number of stride-2 stages between the 4x4 map and an image of side image_size (a power of 2 >= 8)."""
    if image_size < 8 or image_size & (image_size - 1):
        raise ValueError(f"image_size must be a power of 2 >= 8, got {image_size}")
    return image_size.bit_length() - 3  # log2(image_size) - 2


@torch.no_grad()
def dcgan_init(module: nn.Module, embedding_std: float) -> None:
    """The paper's init on every submodule: N(0, 0.02) (de)conv weights, zero biases, BatchNorm scale
    N(1, 0.02) (as the reference implementations do) and shift 0, fresh running statistics."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, mean=1.0, std=INIT_STD)
            nn.init.zeros_(m.bias)
            m.reset_running_stats()
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=embedding_std)


class DCGANGenerator(nn.Module):
    """z [B, latent_dim] (and labels [B]) -> images [B, channels, image_size, image_size] in [-1, 1] (tanh).

    Conditional (`num_classes > 0`): the label's learned embedding, of size latent_dim and initialized
    N(0, 1) like z, is concatenated to z, so the first deconvolution sees 2 * latent_dim inputs. The
    simplest conditioning that keeps the architecture; G's BatchNorms stay unconditional.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 3,
        image_size: int = 64,
        base_channels: int = 64,
        num_classes: int = 0,
    ) -> None:
        super().__init__()
        levels = resolution_levels(image_size)
        self.latent_dim, self.channels, self.image_size, self.num_classes = (
            latent_dim,
            channels,
            image_size,
            num_classes,
        )
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes else None
        width = base_channels * 2 ** (levels - 1)
        in_dim = 2 * latent_dim if num_classes else latent_dim
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(in_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
        for _ in range(levels - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.init_weights()

    def init_weights(self) -> None:
        dcgan_init(self, embedding_std=1.0)

    def forward(self, z: Tensor, labels: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if labels is None:
                raise ValueError(f"this generator is class-conditional ({self.num_classes} classes): pass labels")
            z = torch.cat([z, self.embed(labels).to(z.dtype)], dim=1)
        elif labels is not None:
            raise ValueError("this generator is unconditional (num_classes=0): labels must be None")
        return self.net(z[:, :, None, None])


class DCGANDiscriminator(nn.Module):
    """images [B, channels, image_size, image_size] (and labels [B]) -> raw logits [B] (no sigmoid: the losses
    take logits, which is numerically safer).

    BatchNorm (the paper's, on every stride-2 conv but the first) makes a sample's logit depend on the other
    samples of its batch in training mode; the method therefore runs D on real and on fake images in separate
    batches, as the paper does, so neither batch's statistics leak into the other's decision.

    Conditional (`num_classes > 0`): logit = out(f) + <embed(label), sum over pixels of f>, f the last 4x4
    features (after the activation). Sum pooling, as in Miyato & Koyama's discriminators, and an N(0, 0.02)
    embedding make the projection term the same size at init as the unconditional 4x4 output conv, which is
    itself a sum over those pixels.
    """

    def __init__(self, channels: int = 3, image_size: int = 64, base_channels: int = 64, num_classes: int = 0) -> None:
        super().__init__()
        levels = resolution_levels(image_size)
        self.channels, self.image_size, self.num_classes = channels, image_size, num_classes
        layers: list[nn.Module] = [nn.Conv2d(channels, base_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = base_channels
        for _ in range(levels - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2)]
            width *= 2
        self.net = nn.Sequential(*layers)
        self.feature_channels = width
        self.out = nn.Conv2d(width, 1, 4, 1, 0)
        self.embed = nn.Embedding(num_classes, width) if num_classes else None
        self.init_weights()

    def init_weights(self) -> None:
        dcgan_init(self, embedding_std=INIT_STD)

    def features(self, images: Tensor) -> Tensor:
        """[B, feature_channels, 4, 4]: what both the output conv and the projection read."""
        return self.net(images)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> Tensor:
        f = self.features(images)
        logits = self.out(f).flatten()
        if self.embed is not None:
            if labels is None:
                raise ValueError(f"this discriminator is class-conditional ({self.num_classes} classes): pass labels")
            logits = logits + (self.embed(labels).to(f.dtype) * f.sum(dim=(2, 3))).sum(dim=1)
        elif labels is not None:
            raise ValueError("this discriminator is unconditional (num_classes=0): labels must be None")
        return logits
