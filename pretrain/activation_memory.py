"""Building blocks of the analytic memory model: what a block saves for backward, and the collectives a
method issues by itself. Each method counts its own activations from these (its spec's `activations`),
as it counts its FLOPs from pretrain/flops.py; `pretrain plan` adds them up.

Activations are the tensors autograd saves in forward for backward (what dominates training memory),
counted from our own modules:

- a pre-norm ViT block on T tokens of width D saves 16 T D elements: both LayerNorm inputs, the qkv
  input and output (3 T D), the attention output (which is also the projection's input: SDPA returns it
  in [B, T, H, d] memory order, so the transpose back is free), the MLP's input, the GELU's input and
  output (4 T D each); plus fp32 statistics (LayerNorm mean and rstd, 2 T each; the attention's
  log-sum-exp, H T);
- a DiT block saves 20 T D: the ViT block's, plus both normalized outputs that adaLN modulates and both
  gated branch outputs;
- with activation checkpointing a block keeps only its input (T D) and one block's activations are
  recomputed at a time in backward.

Everything outside the blocks (patch embedding input, heads, losses) is summed term by term by each method; the
CPU calibration (benchmarks/plan_calibration.py) measures the saved tensors of real runs against these.
Element size: 2 bytes under bf16 autocast, 4 in fp32; statistics and losses are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

STAT = 4  # fp32 statistics and loss terms
INDEX = 8  # int64 indices


@dataclass(frozen=True)
class Collective:
    """A collective a method issues every micro-step, beyond what the engine does for parameters."""

    name: str
    kind: str  # all_gather | all_reduce
    bytes: int  # payload of one call on one rank (all_gather: this rank's contribution)
    calls: int  # per micro-step


def vit_block(tokens: int, dim: int, heads: int, act: int) -> int:
    return 16 * tokens * dim * act + (4 * tokens + heads * tokens) * STAT


def dit_block(tokens: int, dim: int, heads: int, act: int) -> int:
    return 20 * tokens * dim * act + (4 * tokens + heads * tokens) * STAT + 8 * dim * act


def blocks_bytes(per_block: int, input_bytes: int, depth: int, checkpointing: bool) -> int:
    """Saved by `depth` blocks; with checkpointing, their inputs plus one block recomputed in backward."""
    return depth * input_bytes + per_block if checkpointing else depth * per_block


def layer_norm_bytes(tokens: int, dim: int, act: int) -> int:
    return tokens * dim * act + 2 * tokens * STAT


def global_bn_bytes(dim: int) -> int:
    # x.float(), its square, the normalized output and the affine's input: fp32
    return 4 * dim * STAT


def batch_norm_bytes(channels: int, side: int) -> int:
    """A training-mode BatchNorm as the engines run it (GlobalBatchNorm; MoCo's GroupBatchNorm alike) saves
    three fp32 tensors of its input's size: the centred input twice (for the variance and the normalization)
    and the normalized output the affine multiplies; its per-channel statistics are negligible."""
    return 3 * channels * side * side * STAT


def resnet_bytes(depth: int, image_size: int, in_chans: int, stem: str, act: int) -> int:
    """Saved for backward by one image through our ResNet (pretrain/models/resnet.py) with the engines'
    BatchNorm: the image (the first conv's input), each BatchNorm's three fp32 tensors, each in-place ReLU's
    output (which is also the next convolution's saved input), and the max-pool's indices. The pooled
    feature saves nothing. A ResNet refuses activation checkpointing, so there is no checkpointed form."""
    from pretrain.models.resnet import RESNET_DEPTHS, STAGE_WIDTHS

    kind, counts = RESNET_DEPTHS[depth]
    expansion = 1 if kind == "basic" else 4
    half = lambda side: (side + 1) // 2  # noqa: E731  every stride-2 conv and the max-pool: ceil(side / 2)
    side = half(image_size) if stem == "imagenet" else image_size
    total = in_chans * image_size**2 * act + batch_norm_bytes(64, side) + 64 * side**2 * act
    if stem == "imagenet":
        side = half(side)
        total += 64 * side**2 * INDEX
    planes_in = 64
    for index, (planes, count) in enumerate(zip(STAGE_WIDTHS, counts)):
        for block in range(count):
            stride = 2 if index > 0 and block == 0 else 1
            out_side, out_planes = (half(side) if stride == 2 else side), planes * expansion
            if kind == "basic":
                total += 2 * batch_norm_bytes(planes, out_side) + planes * out_side**2 * act
            else:
                total += batch_norm_bytes(planes, side) + planes * side**2 * act
                total += batch_norm_bytes(planes, out_side) + planes * out_side**2 * act
                total += batch_norm_bytes(out_planes, out_side)
            if stride != 1 or planes_in != out_planes:
                total += batch_norm_bytes(out_planes, out_side)
            total += out_planes * out_side**2 * act  # the ReLU after the residual sum
            side, planes_in = out_side, out_planes
    return total
