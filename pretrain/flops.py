"""Analytic FLOP counting: the building blocks every method's count is made of, and the bf16 peak of the
device, for MFU. Each method counts its own FLOPs per sample in its file (its spec's `flops`).

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


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0, ffn: str = "mlp") -> float:
    """One pre-norm transformer block on `tokens` tokens: qkv, scores, weighted sum, output projection, MLP
    (or SwiGLU: its fused 2 x hidden input linear and its output linear).

    The head count does not matter: heads split the width, and scores + sum are 2 x tokens^2 x dim MACs."""
    from pretrain.models.transformer import swiglu_hidden

    projections = linear_flops(tokens, dim, 3 * dim) + linear_flops(tokens, dim, dim)
    attention = 2 * (2.0 * tokens * tokens * dim)
    if ffn == "swiglu":
        hidden = swiglu_hidden(dim, mlp_ratio)
        return projections + attention + linear_flops(tokens, dim, 2 * hidden) + linear_flops(tokens, hidden, dim)
    hidden = int(dim * mlp_ratio)
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
    prefix_tokens: int = 1,
    ffn: str = "mlp",
) -> tuple[float, float]:
    """(patch embedding, cls token + registers + blocks + head) FLOPs of one image through our VisionTransformer.

    The patch embedding runs on every patch; `kept_patches` (MAE's visible set) and the `prefix_tokens`
    (cls and registers) enter the blocks."""
    patches = (image_size // patch_size) ** 2
    tokens = (patches if kept_patches is None else kept_patches) + prefix_tokens
    embed = linear_flops(patches, patch_size * patch_size * in_chans, dim)
    body = depth * block_flops(tokens, dim, mlp_ratio, ffn) + linear_flops(1, dim, num_classes)
    return embed, body


def conv_flops(out_side: int, in_chans: int, out_chans: int, kernel: int) -> float:
    """A bias-free 2-D convolution with a square output of side `out_side`."""
    return 2.0 * out_side * out_side * in_chans * out_chans * kernel * kernel


def resnet_flops(depth: int, image_size: int, in_chans: int = 3, stem: str = "imagenet", num_classes: int = 0) -> float:
    """One image through our ResNet (pretrain/models/resnet.py): every convolution (downsampling
    shortcuts included) and the fc head; 8.2 GFLOPs for ResNet-50 at 224 (4.1 GMACs as published)."""
    from pretrain.models.resnet import RESNET_DEPTHS, STAGE_WIDTHS

    kind, counts = RESNET_DEPTHS[depth]
    expansion = 1 if kind == "basic" else 4
    conv_out = lambda side, kernel, stride, pad: (side + 2 * pad - kernel) // stride + 1  # noqa: E731
    if stem == "imagenet":
        side = conv_out(image_size, 7, 2, 3)
        total = conv_flops(side, in_chans, 64, 7)
        side = conv_out(side, 3, 2, 1)  # max-pool
    else:
        side = image_size
        total = conv_flops(side, in_chans, 64, 3)
    planes_in = 64
    for index, (planes, count) in enumerate(zip(STAGE_WIDTHS, counts)):
        for block in range(count):
            stride = 2 if index > 0 and block == 0 else 1
            out_side = conv_out(side, 3, stride, 1)
            out_planes = planes * expansion
            if kind == "basic":
                total += conv_flops(out_side, planes_in, planes, 3) + conv_flops(out_side, planes, planes, 3)
            else:
                total += conv_flops(side, planes_in, planes, 1) + conv_flops(out_side, planes, planes, 3)
                total += conv_flops(out_side, planes, out_planes, 1)
            if stride != 1 or planes_in != out_planes:
                total += conv_flops(out_side, planes_in, out_planes, 1)
            side, planes_in = out_side, out_planes
    return total + linear_flops(1, planes_in, num_classes)


def mlp_flops(dims: list[int]) -> float:
    """A stack of linears on one vector: dims[0] -> dims[1] -> ... -> dims[-1]."""
    return sum(linear_flops(1, a, b) for a, b in zip(dims[:-1], dims[1:]))


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
    return peak_flops_by_name(torch.cuda.get_device_name(device))


def peak_flops_by_name(name: str) -> float | None:
    """The table's bf16 peak for a device name such as 'H100' or 'NVIDIA H100 80GB HBM3'; None if unknown."""
    return next((peak for key, peak in PEAK_BF16_FLOPS if key.upper() in name.upper()), None)


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
