"""What each method holds for backward and communicates by itself, per micro-batch, in closed form.

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

Everything outside the blocks (patch embedding input, heads, losses) is summed term by term below; the
CPU calibration (benchmarks/plan_calibration.py) measures the saved tensors of real runs against these.
Element size: 2 bytes under bf16 autocast, 4 in fp32; statistics and losses are fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

from pretrain.config import Config

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


def _vit(cfg: Config) -> tuple[int, int, int]:
    from pretrain.models.vit import VIT_SIZES

    return VIT_SIZES[cfg.model.size]


def _layer_norm(tokens: int, dim: int, act: int) -> int:
    return tokens * dim * act + 2 * tokens * STAT


def mae_activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: encoder on the visible patches + cls, decoder on all patches + cls, pixel loss."""
    mae, data, model = cfg.method.mae, cfg.data, cfg.model
    dim, depth, heads = _vit(cfg)
    patches = (data.image_size // model.patch_size) ** 2
    kept = int(patches * (1 - mae.mask_ratio))
    patch_dim = model.patch_size**2 * model.in_chans
    enc_t, dec_t, dd = kept + 1, patches + 1, mae.decoder_dim
    return {
        "encoder blocks": blocks_bytes(vit_block(enc_t, dim, heads, act), enc_t * dim * act, depth, checkpointing),
        "decoder blocks": blocks_bytes(
            vit_block(dec_t, dd, mae.decoder_heads, act), dec_t * dd * act, mae.decoder_depth, checkpointing
        ),
        "patch embedding input": model.in_chans * data.image_size**2 * act,
        # each final norm's input and statistics, and its output (the next linear's input)
        "norms, decoder embedding and prediction inputs": _layer_norm(enc_t, dim, act)
        + enc_t * dim * act
        + _layer_norm(dec_t, dd, act)
        + dec_t * dd * act,
        "masking indices": (kept + patches) * INDEX,
        "loss (pixel error, mask)": patches * patch_dim * STAT + patches * STAT,
    }


def _global_bn(dim: int) -> int:
    # x.float(), its square, the normalized output and the affine's input: fp32
    return 4 * dim * STAT


def moco_activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample (two views): the query backbone and heads; the momentum branch runs without grad."""
    moco, data, model = cfg.method.moco, cfg.data, cfg.model
    dim, depth, heads = _vit(cfg)
    tokens = (data.image_size // model.patch_size) ** 2 + 1
    mlp, proj = moco.mlp_dim, moco.proj_dim
    projector = dim * act + 2 * (mlp * act + _global_bn(mlp) + mlp * act) + mlp * act + _global_bn(proj)
    predictor = proj * act + _global_bn(mlp) + 2 * mlp * act
    return {
        "backbone blocks": 2
        * blocks_bytes(vit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": 0 if moco.freeze_patch_embed else 2 * model.in_chans * data.image_size**2 * act,
        "final norm": 2 * _layer_norm(tokens, dim, act),
        "projector and predictor": 2 * (projector + predictor),
        "InfoNCE (queries, keys, log-sum-exp)": 2 * 3 * proj * STAT,
    }


def dino_activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: the student on 2 global + data.local_crops local views, its head and the loss over
    out_dim prototypes; the teacher runs without grad."""
    dino, data, model = cfg.method.dino, cfg.data, cfg.model
    dim, depth, heads = _vit(cfg)
    views = [(data.image_size // model.patch_size) ** 2 + 1] * 2
    views += [(data.local_crop_size // model.patch_size) ** 2 + 1] * data.local_crops
    block_total = sum(blocks_bytes(vit_block(t, dim, heads, act), t * dim * act, depth, checkpointing) for t in views)
    hidden_layers = dino.head_layers - 1
    head = (dim + hidden_layers * 3 * dino.hidden_dim + 2 * dino.bottleneck_dim) * act
    logits = dino.out_dim * (act + 2 * STAT)  # logits, and the fp32 log-softmax the cross-entropy keeps
    return {
        "backbone blocks": block_total,
        "patch embedding inputs": model.in_chans
        * (2 * data.image_size**2 + data.local_crops * data.local_crop_size**2)
        * act,
        "final norms": sum(_layer_norm(t, dim, act) for t in views),
        "head (MLP, bottleneck, prototypes)": len(views) * (head + logits),
    }


def dit_activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sample: one forward of the online DiT on the noisy input, and the velocity MSE."""
    from pretrain.models.dit import DIT_SIZES

    dit = cfg.method.dit
    dim0, depth0, heads0 = DIT_SIZES[dit.size]
    dim, depth, heads = dit.hidden_dim or dim0, dit.depth or depth0, dit.num_heads or heads0
    tokens = (dit.input_size // dit.patch_size) ** 2
    values = dit.in_channels * dit.input_size**2
    return {
        "blocks": blocks_bytes(dit_block(tokens, dim, heads, act), tokens * dim * act, depth, checkpointing),
        "patch embedding input": values * act,
        "final layer (norm, modulation, linear)": 3 * tokens * dim * act + 2 * tokens * STAT,
        "loss (velocity error)": values * STAT,
    }


ACTIVATIONS = {"mae": mae_activations, "moco": moco_activations, "dino": dino_activations, "dit": dit_activations}

# Whether the averaged twin (momentum encoder, teacher, EMA copy) runs forward in training: its FSDP units
# are then all-gathered every step (forward only, no gradient).
AVERAGED_RUNS_FORWARD = {"mae": False, "moco": True, "dino": True, "dit": False}


def activations_per_sample(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    name = cfg.method.name
    if name not in ACTIVATIONS:
        raise ValueError(f"method.name: the planner has no activation model for '{name}'")
    return ACTIVATIONS[name](cfg, act, checkpointing)


def method_collectives(cfg: Config, micro_batch: int, act: int) -> list[Collective]:
    """MoCo: each rank's keys all-gathered (both views) and the heads' batch-norm moments all-reduced
    (forward, and backward for the trained heads); DINO: the center's all-reduce."""
    name = cfg.method.name
    if name == "moco":
        moco = cfg.method.moco
        # moments of one BN layer: sum, sum of squares (dim each) and the count, fp32
        bn = lambda d: (2 * d + 1) * STAT  # noqa: E731
        query_bns = [moco.mlp_dim, moco.mlp_dim, moco.proj_dim, moco.mlp_dim]  # projector (3), predictor (1)
        momentum_bns = [moco.mlp_dim, moco.mlp_dim, moco.proj_dim]
        return [
            Collective("MoCo keys", "all_gather", micro_batch * moco.proj_dim * act, 2),
            Collective("BN moments, query heads (forward + backward)", "all_reduce", sum(map(bn, query_bns)), 2 * 2),
            Collective("BN moments, momentum heads", "all_reduce", sum(map(bn, momentum_bns)), 2),
        ]
    if name == "dino":
        return [Collective("DINO center", "all_reduce", cfg.method.dino.out_dim * STAT, 1)]
    return []
