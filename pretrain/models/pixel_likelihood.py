"""Likelihoods of 8-bit pixels for autoregressive image models: PixelCNN's 256-way softmax and PixelCNN++'s
discretized logistic mixture (Salimans et al. 2017), as negative log-likelihoods in nats per image, bits per
dimension, and sampling.

The network output has one parameter axis after the image channels, [B, C, K, H, W]: K = 256 logits, or
K = 3 * n_mix mixture parameters in three blocks of n_mix (logit weights, means, log-scales). Pixels are
integers 0..255. The logistic lives on the [-1, 1] scale the network sees: value v owns the bin centred at
v / 127.5 - 1 of half-width 1 / 255, and the two end bins reach out to -inf and +inf, so the 256 bin
probabilities sum to one. Likelihoods are computed in float32 (or float64) whatever the output's dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

PIXEL_LEVELS = 256
BIN_HALF_WIDTH = 1.0 / 255.0  # on the [-1, 1] scale, where neighbouring values are 2 / 255 apart
MIN_LOG_SCALE = -7.0  # PixelCNN++'s floor: a collapsing component cannot push a bin's log-probability to -inf
LOG_WIDTH_CUTOFF = math.log(1e-5)  # below it, log(1 - exp(-d)) is log(d) - d / 2 to float precision


def scale_pixels(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """Integers 0..255 -> [-1, 1], the bin centres of the logistic."""
    return x.to(dtype) / 127.5 - 1.0


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def categorical_log_prob(logits: Tensor, x: Tensor) -> Tensor:
    """[B, C, 256, H, W] logits, [B, C, H, W] integer pixels -> log p(x) per element, [B, C, H, W]."""
    log_probs = F.log_softmax(logits.to(_compute_dtype(logits)), dim=2)
    return log_probs.gather(2, x.long().unsqueeze(2)).squeeze(2)


def categorical_nll(logits: Tensor, x: Tensor) -> Tensor:
    """Negative log-likelihood in nats per image, [B] (summed over channels and pixels)."""
    return -categorical_log_prob(logits, x).flatten(1).sum(1)


def _log_one_minus_exp_neg(log_d: Tensor) -> Tensor:
    """log(1 - exp(-d)) from log(d), d > 0, without cancellation for small d nor log(0) when d underflows."""
    small = log_d < LOG_WIDTH_CUTOFF
    d = torch.exp(torch.where(small, torch.zeros_like(log_d), log_d))  # the unused branch stays finite
    return torch.where(small, log_d - torch.exp(log_d) / 2, torch.log(-torch.expm1(-d)))


def logistic_mixture_log_prob(params: Tensor, x: Tensor, n_mix: int) -> Tensor:
    """[B, C, 3 * n_mix, H, W] parameters, [B, C, H, W] integer pixels -> log p(x) per element, [B, C, H, W].

    With a = (x + 1/255 - mu) / s and b = (x - 1/255 - mu) / s on the [-1, 1] scale, a bin holds
    sigmoid(a) - sigmoid(b), written as sigmoid(a) * sigmoid(-b) * (1 - exp(-(a - b))) so its log is a sum
    of log-sigmoids (stable in both tails) and log(1 - exp(-d)) of the bin's width d = (2/255) / s (stable for
    narrow and wide components alike). Value 0 takes the whole lower tail, sigmoid(a); 255 the upper tail,
    1 - sigmoid(b).
    """
    params = params.to(_compute_dtype(params))
    logit_weights, means, log_scales = params.split(n_mix, dim=2)
    log_scales = log_scales.clamp_min(MIN_LOG_SCALE)
    pixels = x.long().unsqueeze(2)
    centred = scale_pixels(pixels, params.dtype) - means
    inv_scales = torch.exp(-log_scales)
    upper = inv_scales * (centred + BIN_HALF_WIDTH)
    lower = inv_scales * (centred - BIN_HALF_WIDTH)
    log_width = math.log(2 * BIN_HALF_WIDTH) - log_scales
    inner = F.logsigmoid(upper) + F.logsigmoid(-lower) + _log_one_minus_exp_neg(log_width)
    log_bin = torch.where(
        pixels == 0, F.logsigmoid(upper), torch.where(pixels == PIXEL_LEVELS - 1, F.logsigmoid(-lower), inner)
    )
    return torch.logsumexp(F.log_softmax(logit_weights, dim=2) + log_bin, dim=2)


def logistic_mixture_nll(params: Tensor, x: Tensor, n_mix: int) -> Tensor:
    """Negative log-likelihood in nats per image, [B] (summed over channels and pixels)."""
    return -logistic_mixture_log_prob(params, x, n_mix).flatten(1).sum(1)


def bits_per_dim(nll_nats: Tensor, num_dims: int) -> Tensor:
    """Per-image nats -> bits per sub-pixel, the unit image likelihoods are reported in (8 = uniform)."""
    return nll_nats / (num_dims * math.log(2.0))


def _gumbel(shape: torch.Size, like: Tensor, generator: torch.Generator | None) -> Tensor:
    u = torch.rand(shape, generator=generator, device=like.device, dtype=torch.float32)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))


def sample_categorical(logits: Tensor, generator: torch.Generator | None, temperature: float = 1.0) -> Tensor:
    """[B, C, 256, H, W] logits -> [B, C, H, W] int64 pixels, by Gumbel-max (argmax of logits / T + noise).

    The noise is one uniform per logit whatever the logits are, so the generator advances by the same amount
    on every call of the same shape; samplers that compute the logits differently stay in step."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    scores = logits.float() / temperature + _gumbel(logits.shape, logits, generator)
    return scores.argmax(dim=2)


def sample_logistic_mixture(params: Tensor, n_mix: int, generator: torch.Generator | None) -> Tensor:
    """[B, C, 3 * n_mix, H, W] parameters -> [B, C, H, W] int64 pixels: pick a component (Gumbel-max), draw
    a logistic by inverse CDF, and round to the bin that holds it (the end bins take the tails)."""
    params = params.float()
    logit_weights, means, log_scales = params.split(n_mix, dim=2)
    component = (logit_weights + _gumbel(logit_weights.shape, params, generator)).argmax(dim=2, keepdim=True)
    mean = means.gather(2, component).squeeze(2)
    scale = torch.exp(log_scales.clamp_min(MIN_LOG_SCALE).gather(2, component).squeeze(2))
    eps = 1e-6  # keeps the logistic's inverse CDF finite; the tails beyond it fall in the end bins anyway
    u = torch.rand(mean.shape, generator=generator, device=params.device).clamp(eps, 1 - eps)
    value = mean + scale * (torch.log(u) - torch.log1p(-u))
    return torch.round((value + 1.0) * 127.5).clamp(0, PIXEL_LEVELS - 1).long()
