"""Bytes each rank communicates per optimizer step, from the sharding plan and the method's collectives.

Sizes are the collective's full payload (all-gather: the unsharded result; reduce-scatter: the unsharded
input; all-reduce: the tensor). A ring moves (W-1)/W of that per rank for all-gather and reduce-scatter,
and 2 (W-1)/W for all-reduce: the "wire" bytes that set the time at a link's bandwidth.

What each engine issues (A = optim.accum_steps micro-steps per step):
- fsdp: every micro-step all-gathers the root unit once (FSDP2 keeps the root gathered through backward),
  each trained block unit in forward and again in backward (engine.fsdp.reshard_after_forward; once without),
  each frozen block unit that runs (MoCo's momentum encoder, DINO's teacher) in forward; gradients are
  reduce-scattered once per step in fp32 (engine.set_requires_gradient_sync skips the other micro-steps).
  Everything but the first unit's gather and the last reduce-scatter can overlap with compute.
- ddp: one fp32 all-reduce of the gradients per step, in 25 MiB buckets overlapped with backward.
- deepspeed ZeRO-1/2: gradients reduce-scattered (stage 1 at the step boundary, stage 2 every micro-step)
  and updated parameters all-gathered after the step, in the parameter dtype; our DeepSpeed config leaves
  overlap_comm at its default (off), so none of it overlaps with compute.
- deepspeed ZeRO-3: parameters all-gathered in forward and backward and gradients reduce-scattered every
  micro-step, overlapped (stage 3 turns overlap_comm on).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from pretrain.activation_memory import Collective
from pretrain.plan.fake_world import ParamRecord

DDP_BUCKET_BYTES = 25 * 2**20


@dataclass
class Transfer:
    name: str
    kind: str  # all_gather | reduce_scatter | all_reduce
    bytes_per_step: int  # full payload, summed over the calls of one optimizer step
    overlaps: bool  # can run while compute runs (otherwise it adds to the step)

    def wire_bytes(self, world: int) -> float:
        if world <= 1:
            return 0.0
        factor = 2 * (world - 1) / world if self.kind == "all_reduce" else (world - 1) / world
        return self.bytes_per_step * factor

    def as_dict(self, world: int) -> dict:
        return {**asdict(self), "wire_bytes_per_step": self.wire_bytes(world)}


def _units(records: list[ParamRecord], world: int) -> dict[str, dict]:
    """Per FSDP unit: unsharded (padded) elements, trained elements, whether any parameter is trained."""
    from pretrain.plan.state_memory import fsdp_shard_numel

    units: dict[str, dict] = {}
    for r in records:
        _, padded = fsdp_shard_numel(r.shape, world, 0)
        unit = units.setdefault(r.group, {"numel": 0, "trained": 0})
        unit["numel"] += padded * world
        if r.requires_grad:
            unit["trained"] += padded * world
    return units


def fsdp_transfers(
    records: list[ParamRecord],
    world: int,
    accum: int,
    param_bytes: int,
    reshard_after_forward: bool,
    averaged_runs: bool,
) -> list[Transfer]:
    units = _units(records, world)
    root = units.pop("root", {"numel": 0, "trained": 0})
    trained = sum(u["numel"] for u in units.values() if u["trained"])
    frozen_run = sum(u["numel"] for u in units.values() if not u["trained"]) if averaged_runs else 0
    block_gathers = 2 if reshard_after_forward else 1
    grads = root["trained"] + sum(u["trained"] for u in units.values())
    return [
        Transfer("root unit parameters", "all_gather", accum * root["numel"] * param_bytes, False),
        Transfer(
            "trained blocks' parameters (forward" + (" + backward)" if reshard_after_forward else ")"),
            "all_gather",
            accum * block_gathers * trained * param_bytes,
            True,
        ),
        Transfer(
            "frozen blocks that run forward (momentum/teacher)", "all_gather", accum * frozen_run * param_bytes, True
        ),
        Transfer("gradients (fp32 reduce_dtype)", "reduce_scatter", grads * 4, True),
    ]


def ddp_transfers(records: list[ParamRecord]) -> list[Transfer]:
    grads = sum(r.numel for r in records if r.requires_grad) * 4
    return [Transfer("gradients (fp32, bucketed)", "all_reduce", grads, True)]


def zero_transfers(
    records: list[ParamRecord], stage: int, accum: int, param_bytes: int, averaged_runs: bool
) -> list[Transfer]:
    trained = sum(r.numel for r in records if r.requires_grad)
    if stage in (1, 2):
        reductions = 1 if stage == 1 else accum
        return [
            Transfer("gradients", "reduce_scatter", reductions * trained * param_bytes, False),
            Transfer("updated parameters after the step", "all_gather", trained * param_bytes, False),
        ]
    frozen_run = sum(r.numel for r in records if not r.requires_grad) if averaged_runs else 0
    return [
        Transfer(
            "parameters (forward + backward)", "all_gather", accum * (2 * trained + frozen_run) * param_bytes, True
        ),
        Transfer("gradients", "reduce_scatter", accum * trained * param_bytes, True),
    ]


def method_transfers(collectives: list[Collective], accum: int) -> list[Transfer]:
    """Method collectives are small and sit on the critical path (the loss needs them): not overlapped."""
    return [Transfer(c.name, c.kind, accum * c.calls * c.bytes, False) for c in collectives]


def exposed_block_bytes(records: list[ParamRecord], world: int, param_bytes: int, grad_bytes: int) -> dict[str, int]:
    """Payload that cannot overlap with compute in FSDP / ZeRO-3: the first block's all-gather before any
    compute, and the reduce-scatter of the last gradients (the root unit's and one block's) after all of it."""
    units = _units(records, world)
    root = units.pop("root", {"numel": 0, "trained": 0})
    largest = max((u["numel"] for u in units.values()), default=0)
    largest_trained = max((u["trained"] for u in units.values()), default=0)
    return {
        "all_gather": largest * param_bytes,
        "reduce_scatter": (root["trained"] + largest_trained) * grad_bytes,
    }
