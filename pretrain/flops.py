"""Analytic FLOPs per training sample for every method, and the bf16 peak of the device, for MFU.

Conventions: a multiply-add is 2 FLOPs, and only matrix products are counted (linears, the patch
convolution, attention scores and their weighted sum). Normalizations, softmax, activations, losses and
elementwise ops are left out: they are a few percent at most and not what tensor cores do. This is also
what `torch.utils.flop_counter.FlopCounterMode` counts, which the tests hold these formulas against.
Published "GFLOPs" for ViT (17.6 for ViT-B/16 at 224) and DiT (118.6 for DiT-XL/2) count multiply-adds,
i.e. half of the FLOPs here.

Training FLOPs = 3 x the forward of trained parts (forward, plus the two products of the backward:
gradients of inputs and of weights) + 1 x the forward of parts that get no gradient (momentum encoders,
DINO's teacher, MoCo's frozen patch projection). A "sample" is one image with all its views, the unit
the train loop's samples/s counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pretrain.config import Config


@dataclass
class FlopCount:
    """Forward FLOPs of one sample, split by whether the part is trained."""

    trained: float = 0.0
    frozen: float = 0.0

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.trained + other.trained, self.frozen + other.frozen)

    def as_frozen(self) -> FlopCount:
        return FlopCount(0.0, self.trained + self.frozen)

    def summary(self) -> dict[str, float]:
        return {"forward": self.trained + self.frozen, "train": 3 * self.trained + self.frozen}


def linear_flops(tokens: float, d_in: int, d_out: int) -> float:
    return 2.0 * tokens * d_in * d_out


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0) -> float:
    """One pre-norm transformer block on `tokens` tokens: qkv, scores, weighted sum, output projection, MLP.

    The head count does not matter: heads split the width, and scores + sum are 2 x tokens^2 x dim MACs."""
    hidden = int(dim * mlp_ratio)
    projections = linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim)
    attention = 2 * (2.0 * tokens * tokens * dim)
    mlp = linear_flops(tokens, dim, hidden) + linear_flops(tokens, hidden, dim)
    return projections + attention + mlp


def vit_flops(
    image_size: int,
    patch_size: int,
    in_chans: int,
    dim: int,
    depth: int,
    mlp_ratio: float = 4.0,
    kept_patches: int | None = None,
    num_classes: int = 0,
) -> tuple[float, float]:
    """(patch embedding, cls token + blocks + head) FLOPs of one image through our VisionTransformer.

    The patch embedding runs on every patch; `kept_patches` (MAE's visible set) enter the blocks."""
    patches = (image_size // patch_size) ** 2
    tokens = (patches if kept_patches is None else kept_patches) + 1
    embed = linear_flops(patches, patch_size * patch_size * in_chans, dim)
    body = depth * block_flops(tokens, dim, mlp_ratio) + linear_flops(1, dim, num_classes)
    return embed, body


def _vit_dims(cfg: Config) -> tuple[int, int]:
    from pretrain.models.vit import VIT_SIZES

    dim, depth, _ = VIT_SIZES[cfg.model.size]
    return dim, depth


def _encoder(cfg: Config, image_size: int, frozen_embed: bool = False, kept: int | None = None) -> FlopCount:
    dim, depth = _vit_dims(cfg)
    embed, body = vit_flops(image_size, cfg.model.patch_size, cfg.model.in_chans, dim, depth, kept_patches=kept)
    return FlopCount(body, embed) if frozen_embed else FlopCount(embed + body)


def mlp_flops(dims: list[int]) -> float:
    """A stack of linears on one vector: dims[0] -> dims[1] -> ... -> dims[-1]."""
    return sum(linear_flops(1, a, b) for a, b in zip(dims[:-1], dims[1:]))


def mae_flops(cfg: Config) -> FlopCount:
    """Encoder on the visible patches (+ cls), decoder embedding, decoder blocks on all patches + cls, prediction."""
    mae, dim = cfg.method.mae, _vit_dims(cfg)[0]
    patches = (cfg.data.image_size // cfg.model.patch_size) ** 2
    kept = int(patches * (1 - mae.mask_ratio))
    patch_dim = cfg.model.patch_size**2 * cfg.model.in_chans
    decoder = (
        linear_flops(kept + 1, dim, mae.decoder_dim)
        + mae.decoder_depth * block_flops(patches + 1, mae.decoder_dim)
        + linear_flops(patches, mae.decoder_dim, patch_dim)
    )
    return _encoder(cfg, cfg.data.image_size, kept=kept) + FlopCount(decoder)


def moco_flops(cfg: Config) -> FlopCount:
    """Two views through the query branch (backbone, 3-layer projector, 2-layer predictor) and, forward only,
    the momentum branch (backbone, projector); plus the InfoNCE logits of both query views against this
    process's data.batch_size keys (at world size W the keys are W x as many: under 0.1% of the total)."""
    moco, dim = cfg.method.moco, _vit_dims(cfg)[0]
    backbone = _encoder(cfg, cfg.data.image_size, frozen_embed=moco.freeze_patch_embed)
    projector = mlp_flops([dim, moco.mlp_dim, moco.mlp_dim, moco.proj_dim])
    predictor = mlp_flops([moco.proj_dim, moco.mlp_dim, moco.proj_dim])
    logits = linear_flops(1, moco.proj_dim, cfg.data.batch_size)
    query = backbone + FlopCount(projector + predictor + logits)
    momentum = (_encoder(cfg, cfg.data.image_size) + FlopCount(projector)).as_frozen()
    views = 2
    return FlopCount(views * query.trained, views * (query.frozen + momentum.frozen))


def dino_flops(cfg: Config) -> FlopCount:
    """Student: backbone + head on the 2 global and data.local_crops local views; teacher (forward only):
    backbone + head on the 2 global views; the loss's cross-entropy of every (teacher, student) view pair,
    a product over the out_dim prototypes."""
    dino, dim = cfg.method.dino, _vit_dims(cfg)[0]
    head_dims = [dim] + [dino.hidden_dim] * (dino.head_layers - 1) + [dino.bottleneck_dim, dino.out_dim]
    view = lambda size: _encoder(cfg, size) + FlopCount(mlp_flops(head_dims))  # noqa: E731
    global_view, local_view = view(cfg.data.image_size), view(cfg.data.local_crop_size)
    views = 2 + cfg.data.local_crops
    cross_entropy = linear_flops(2, views, dino.out_dim)
    student = FlopCount(2 * global_view.trained + cfg.data.local_crops * local_view.trained + cross_entropy)
    teacher = FlopCount(0.0, 2 * global_view.trained)
    return student + teacher


def dit_flops(cfg: Config) -> FlopCount:
    """Patch embedding, timestep MLP, per block adaLN (6 x dim^2 per sample) + attention + MLP, final adaLN
    and linear: one forward of the online network (the rectified-flow step; the EMA copy is not run)."""
    from pretrain.models.dit import DIT_SIZES

    dit = cfg.method.dit
    dim0, depth0, _ = DIT_SIZES[dit.size]
    dim, depth = dit.hidden_dim or dim0, dit.depth or depth0
    tokens = (dit.input_size // dit.patch_size) ** 2
    patch_dim = dit.patch_size**2 * dit.in_channels
    freq_dim = 256  # TimestepEmbedder's sinusoidal features
    total = (
        linear_flops(tokens, patch_dim, dim)
        + mlp_flops([freq_dim, dim, dim])
        + depth * (linear_flops(1, dim, 6 * dim) + block_flops(tokens, dim))
        + linear_flops(1, dim, 2 * dim)
        + linear_flops(tokens, dim, patch_dim)
    )
    return FlopCount(total)


# ---------------------------------------------------------------------- device peaks

# Dense bf16 tensor-core peak FLOP/s, matched in order against torch.cuda.get_device_name().
PEAK_BF16_FLOPS: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("H200", 989e12),
    ("A100", 312e12),
]


def device_peak_flops(device: torch.device, override_tflops: float = 0.0) -> float | None:
    """The device's dense bf16 peak in FLOP/s: `override_tflops` if > 0, else the table; None if unknown
    (a CPU has no meaningful bf16 tensor-core peak, so MFU is not reported there)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


# ---------------------------------------------------------------------- device memory

# Memory of each device as nvidia-smi reports it (MiB), matched in order against the device's name. The
# planner (pretrain/plan) compares per-rank totals against it; a CUDA context and NCCL's buffers take
# some of it before training allocates anything.
DEVICE_MEMORY_MIB: list[tuple[str, int]] = [
    ("H100", 81_559),  # H100 80 GB (SXM and PCIe)
    ("H200", 143_771),  # H200 141 GB
    ("A100-40", 40_960),  # A100 40 GB
    ("A100-80", 81_920),  # A100 80 GB
    ("A100", 81_920),
]


def device_memory_bytes(name: str) -> int | None:
    """Bytes of device memory for a name such as 'H100', 'NVIDIA H100 80GB HBM3' or 'A100-40'; None if unknown."""
    key = name.upper().replace(" ", "-")
    if "A100" in key and "40" in key.split("A100", 1)[1]:
        key = "A100-40"
    return next((mib * 2**20 for known, mib in DEVICE_MEMORY_MIB if known in key), None)
