"""GAN losses on raw discriminator logits (D(x) before any sigmoid), as plain functions.

The logistic losses are written with softplus, -log sigmoid(x) = softplus(-x) and -log(1 - sigmoid(x)) =
softplus(x), which stay finite and keep their gradient for logits of any size, where log(sigmoid(x)) would
underflow.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def generator_nonsaturating_loss(fake_logits: Tensor) -> Tensor:
    """mean -log sigmoid(D(G(z))) (Goodfellow et al. 2014's non-saturating G loss): unlike the minimax
    log(1 - sigmoid(D(G(z)))), its gradient is strong exactly when D confidently rejects the fakes."""
    return F.softplus(-fake_logits).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean -log sigmoid(D(x)) + mean -log(1 - sigmoid(D(G(z)))): D's logistic loss, the real and fake
    batches averaged separately (they may differ in size)."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def hinge_discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """mean relu(1 - D(x)) + mean relu(1 + D(G(z))) (Lim & Ye 2017; SNGAN, BigGAN)."""
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: Tensor) -> Tensor:
    """-mean D(G(z)), the generator side of the hinge loss."""
    return -fake_logits.mean()


def r1_penalty(real_images: Tensor, real_logits: Tensor) -> Tensor:
    """R1 (Mescheder et al. 2018): mean over the batch of ||grad_x D(x)||^2, summed over every pixel and channel,
    differentiable (create_graph) so D's parameters get its gradient.

    `real_images` must require grad and `real_logits` come from them. The gradient of sum(D(x)) is the per-sample
    gradient only when D treats samples independently: BatchNorm in training mode (DCGAN's D) couples them,
    the minibatch std layer (StyleGAN's) slightly.

    StyleGAN2's lazy regularization applies it every `interval` D steps with weight gamma / 2 * interval (the
    gamma / 2 of the R1 definition, and the interval making up for the skipped steps): see lazy_r1_weight. The
    training method does the scheduling.
    """
    if not real_images.requires_grad:
        raise ValueError("r1_penalty: real_images must require grad (call .requires_grad_() before running D)")
    (grad,) = torch.autograd.grad(real_logits.sum(), real_images, create_graph=True)
    return grad.square().flatten(1).sum(dim=1).mean()


def lazy_r1_weight(gamma: float, interval: int) -> float:
    """The weight of r1_penalty when it is applied every `interval` steps (StyleGAN2's lazy regularization)."""
    if interval < 1:
        raise ValueError(f"the R1 interval must be >= 1, got {interval}")
    return gamma / 2 * interval
