"""VQ autoencoder (VQ-VAE, van den Oord et al. 2017; VQGAN's generator, Esser et al. 2021): the KL
autoencoder's conv encoder and decoder around a vector quantizer instead of a Gaussian latent.

Layout as VQGAN's: the encoder ends in `arch.latent_channels` maps (one set, not the KL mean and
log-variance), a 1x1 `quant_conv` maps them to `code_dim` for the codebook, a 1x1 `post_quant_conv` maps
codes back for the decoder. Images are in [-1, 1]; the token map is [B, H / f, W / f] for f =
`downsample_factor`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pretrain.models.vae import Decoder, Encoder, VAEArch, vae_arch
from pretrain.models.vq import Update, VectorQuantizer


class VQAutoencoder(nn.Module):
    """encode(images) -> quantized codes and tokens; decode(codes) / decode_indices(tokens) -> images."""

    def __init__(
        self,
        arch: VAEArch,
        num_codes: int,
        code_dim: int,
        beta: float = 0.25,
        update: Update = "ema",
        ema_decay: float = 0.99,
        dead_code_threshold: float = 1.0,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        self.arch = arch
        self.encoder = Encoder(arch)
        # One set of latent maps instead of the KL moments (VQGAN's double_z=False).
        self.encoder.conv_out = nn.Conv2d(arch.block_out_channels[-1], arch.latent_channels, 3, padding=1)
        self.quant_conv = nn.Conv2d(arch.latent_channels, code_dim, 1)
        self.quantizer = VectorQuantizer(
            num_codes,
            code_dim,
            beta=beta,
            update=update,
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
            l2_normalize=l2_normalize,
        )
        self.post_quant_conv = nn.Conv2d(code_dim, arch.latent_channels, 1)
        self.decoder = Decoder(arch)

    @property
    def downsample_factor(self) -> int:
        return self.arch.downsample

    @torch.no_grad()
    def init_weights(self) -> None:
        """PyTorch's default init of every layer and a fresh codebook, e.g. after `to_empty` from meta."""
        for module in self.modules():
            if module is not self and hasattr(module, "reset_parameters"):
                module.reset_parameters()

    def encode(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor | int]]:
        """-> (quantized [B, code_dim, h, w], indices [B, h, w], vq loss, {usage, perplexity, restarted})."""
        out = self.quantizer(self.quant_conv(self.encoder(images)), generator)
        metrics = {"usage": out.usage, "perplexity": out.perplexity, "restarted": out.restarted}
        return out.quantized, out.indices, out.loss, metrics

    def decode(self, quantized: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(quantized))

    def decode_indices(self, indices: Tensor) -> Tensor:
        """Tokens [B, h, w] -> images: what a generative model over the tokens decodes with."""
        return self.decode(self.quantizer.lookup(indices))

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor | int]:
        quantized, indices, vq_loss, metrics = self.encode(images, generator)
        return {"reconstruction": self.decode(quantized), "vq_loss": vq_loss, "indices": indices, **metrics}


def build_vq_autoencoder(
    num_codes: int,
    code_dim: int,
    in_channels: int = 3,
    latent_channels: int = 256,
    downsample: int = 16,
    base_channels: int = 128,
    layers_per_block: int = 2,
    norm_groups: int = 32,
    block_out_channels: Sequence[int] | None = None,
    **quantizer,
) -> VQAutoencoder:
    """f16 with VQGAN's z_channels (256) and the KL-VAE's level widths; `quantizer` goes to VectorQuantizer."""
    arch = vae_arch(
        in_channels, latent_channels, downsample, base_channels, layers_per_block, norm_groups, block_out_channels
    )
    return VQAutoencoder(arch, num_codes, code_dim, **quantizer)
