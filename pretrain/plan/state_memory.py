"""Per-rank bytes of parameters, gradients, optimizer state and engine buffers, for every engine.

FSDP2 numbers come from the shards FSDP2 itself assigned under the fake process group (fake_world.py):
parameters and their reduce-scattered gradients live in per-parameter storage padded to ceil(dim0 / W)
rows on every rank, while AdamW's exp_avg/exp_avg_sq are `zeros_like` the unpadded local shard, so
optimizer state differs between ranks (the last ranks of a small dimension hold nothing).

DeepSpeed cannot be initialized under a fake process group without allocating the model (it flattens
real tensors into its buffers), so ZeRO is computed from DeepSpeed's documented partitioning rules
(Rajbhandari et al. 2020, "ZeRO", and DeepSpeed's zero_optimization docs), with the settings our
engine gives it (pretrain/engines/zero.py: buckets of at most an eighth of the model):
  - optimizer state K = 12 bytes per trainable element (fp32 master copy + Adam's two moments), in
    every stage and at every precision (DeepSpeed keeps a separate fp32 partition even for fp32), plus
    torch AdamW's 4-byte step per parameter group;
  - stage 1: parameters and gradients whole on every rank; stage 2: gradients partitioned;
    stage 3: parameters partitioned too;
  - stages 1/2 flatten each optimizer parameter group and pad it to a multiple of 2 x W elements
    (nccl_start_alignment_factor 2) before splitting it into W equal partitions; stage 3 partitions
    each parameter separately, padded to a multiple of W;
  - stage 3 keeps parameters of at most stage3_param_persistence_threshold (default 1e5) elements
    gathered after their first use: whole on every rank, besides their partition, in the all-gather
    buffer of W partitions (ceil(n / W) x W elements; none at W = 1; measured, benchmarks/plan_calibration.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.plan.fake_world import ParamRecord

FP32 = 4
ADAM_STATE = 2 * FP32  # exp_avg + exp_avg_sq per element
ADAM_STEP = FP32  # torch AdamW's per-parameter `step`, a float32 scalar tensor
ZERO_K = 12  # DeepSpeed: fp32 master + exp_avg + exp_avg_sq per element
ZERO_ALIGNMENT = 2  # DeepSpeed stage 1/2 nccl_start_alignment_factor
ZERO3_PERSISTENCE_THRESHOLD = 100_000  # DeepSpeed's default stage3_param_persistence_threshold


@dataclass
class RankState:
    """Bytes one rank holds: persistent state, and engine buffers that exist only during the step."""

    params: int
    grads: int
    optimizer: int
    buffers: int  # all-gathered parameters, unsharded gradients, communication buckets (peak, not persistent)
    buffers_note: str = ""

    @property
    def persistent(self) -> int:
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict:
        return {**asdict(self), "persistent": self.persistent}


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def fsdp_shard_numel(shape: tuple[int, ...], world: int, rank: int) -> tuple[int, int]:
    """(local, padded) elements of FSDP2's dim-0 shard on `rank`: torch.chunk into ceil(dim0 / W) rows,
    ranks past the end get empty shards; storage is padded to the full chunk on every rank."""
    rows = shape[0] if shape else 1
    rest = 1
    for s in shape[1:]:
        rest *= s
    chunk = ceil_div(rows, world)
    local = max(0, min(chunk, rows - rank * chunk))
    return local * rest, chunk * rest


def _unsharded_group_numel(records: list[ParamRecord]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in records:
        out[r.group] = out.get(r.group, 0) + r.numel
    return out


def fsdp_state(
    records: list[ParamRecord],
    world: int,
    rank: int,
    param_bytes: int,
    grad_bytes: int,
    reshard_after_forward: bool = True,
    averaged_runs: bool = True,
) -> RankState:
    """`records` from fake_world.fsdp_records; this rank's shard of each is recomputed with FSDP2's rule
    (tests hold it against FSDP2's own shards at rank 0 and the last rank)."""
    params = grads = optimizer = 0
    for r in records:
        local, padded = fsdp_shard_numel(r.shape, world, rank)
        params += padded * FP32
        if r.requires_grad:
            grads += padded * FP32  # reduce-scattered in fp32 (reduce_dtype) into padded storage
            optimizer += local * ADAM_STATE + ADAM_STEP
    groups = _unsharded_group_numel(records)
    root = groups.pop("root", 0)
    largest = max(groups.values(), default=0)
    gradients = largest * (grad_bytes + FP32)
    if reshard_after_forward:
        gathered = 2 * largest
        note = "the largest block gathered twice (computing + prefetched)"
    else:
        trained = {r.group for r in records if r.requires_grad}
        gathered = sum(n for g, n in groups.items() if g in trained or averaged_runs)
        note = "every block that runs, gathered from its forward to its backward (reshard_after_forward off)"
    buffers = (root + gathered) * param_bytes + gradients
    note = (
        f"root unit's gathered parameters (kept for the whole step) + {note} + the largest block's unsharded "
        "gradients and their fp32 reduce-scatter input"
    )
    return RankState(params, grads, optimizer, buffers, note)


def replicated_state(records: list[ParamRecord], ddp: bool) -> RankState:
    """single and DDP: fp32 parameters (autocast computes in bf16 from them), fp32 gradients, AdamW."""
    params = sum(r.numel for r in records) * FP32
    trained = [r for r in records if r.requires_grad]
    grads = sum(r.numel for r in trained) * FP32
    optimizer = sum(r.numel * ADAM_STATE + ADAM_STEP for r in trained)
    buffers = grads if ddp else 0  # DDP's gradient buckets (gradient_as_bucket_view is off)
    return RankState(
        params, grads, optimizer, buffers, "DDP gradient buckets: a second fp32 gradient copy" if ddp else ""
    )


def zero_state(records: list[ParamRecord], world: int, stage: int, param_bytes: int, bucket_elements: int) -> RankState:
    """DeepSpeed ZeRO `stage` per rank from its documented rules (module docstring); equal on every rank."""
    trained = [r for r in records if r.requires_grad]
    frozen_numel = sum(r.numel for r in records if not r.requires_grad)
    # torch AdamW steps ZeRO's flat fp32 partitions: one scalar step per (non-empty) parameter group
    steps = ADAM_STEP * len({r.decay for r in trained})
    if stage in (1, 2):
        partition = sum(
            ceil_div(ceil_div(group, ZERO_ALIGNMENT * world) * ZERO_ALIGNMENT * world, world)
            for group in (sum(r.numel for r in trained if r.decay), sum(r.numel for r in trained if not r.decay))
            if group
        )
        trained_numel = sum(r.numel for r in trained)
        params = (trained_numel + frozen_numel) * param_bytes
        grads = (trained_numel if stage == 1 else partition) * param_bytes
        optimizer = partition * ZERO_K + steps
        buffers = bucket_elements * param_bytes
        note = "one gradient reduce bucket (reduce_bucket_size elements)"
    else:
        params = sum(ceil_div(r.numel, world) for r in records) * param_bytes
        # gathered into an all-gather buffer of W partitions: ceil(n / W) x W elements (on one rank the
        # partition is the parameter: nothing is gathered)
        small = [r for r in records if r.numel <= ZERO3_PERSISTENCE_THRESHOLD and world > 1]
        persistent = sum(ceil_div(r.numel, world) * world for r in small) * param_bytes
        params += persistent
        grads = sum(ceil_div(r.numel, world) for r in trained) * param_bytes
        optimizer = sum(ceil_div(r.numel, world) for r in trained) * ZERO_K + steps
        buffers = 2 * bucket_elements * param_bytes
        note = "prefetch bucket of gathered parameters + gradient reduce bucket"
    return RankState(params, grads, optimizer, buffers, note)
