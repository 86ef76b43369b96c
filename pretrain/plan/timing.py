"""A lower bound on step time, and the scaling efficiency it allows.

Compute: the analytic training FLOPs of the step's samples (pretrain/flops.py), plus one more forward of
the trained parts when activation checkpointing recomputes them, at `mfu` x the device's dense bf16 peak.
Communication: each transfer's ring "wire" bytes per rank at a bus bandwidth, from nominal link rates
and no latency. Within one node that is NVLink's per-GPU rate. Across nodes NCCL runs one ring (channel)
per NIC, each carrying 1/G of the data and crossing every node boundary once, so a node's G NICs together
carry what one GPU sends: the bus bandwidth is min(NVLink, G x the InfiniBand bandwidth per GPU) (a
rail-optimized fabric, one NIC per GPU; give --inter-gbps as the node's NIC bandwidth / G otherwise).
Both are optimistic, so the step bound is a lower bound:

    step >= max(compute + exposed communication, all communication)

where exposed communication is what cannot overlap with compute (FSDP's first gather and last
reduce-scatter, DDP's last bucket, all of ZeRO-1/2's, the method's own collectives). With the per-GPU
batch fixed, scaling efficiency against one GPU (which communicates nothing) is compute / step: an upper
bound on what the job can reach. "No overlap" is compute / (compute + all communication).
"""

from __future__ import annotations

from pretrain.config import Config
from pretrain.flops import peak_flops_by_name


def compute_seconds(flops: dict[str, float] | None, cfg: Config, options) -> float:
    """Seconds of compute per optimizer step on one GPU."""

    if flops is None:
        raise ValueError(f"method.name: '{cfg.method.name}' has no analytic FLOP count, so no step-time bound")
    per_sample = flops["train"] + (flops["forward"] if cfg.engine.activation_checkpointing else 0.0)
    samples = cfg.data.batch_size * cfg.optim.accum_steps
    return per_sample * samples / (peak_flops_by_name(options.device) * options.mfu)


def link_bytes_per_second(nodes: int, options) -> float:
    """Bus bandwidth of a collective over all ranks (see the module docstring), bytes/s."""
    gbps = options.intra_gbps if nodes == 1 else min(options.intra_gbps, options.gpus_per_node * options.inter_gbps)
    return gbps * 1e9 / 8


def step_bound(compute: float, transfers: list, exposed: dict[str, int], world: int, options) -> dict:
    bandwidth = link_bytes_per_second(options.nodes, options)
    comm = sum(t.wire_bytes(world) for t in transfers) / bandwidth
    not_overlapped = sum(t.wire_bytes(world) for t in transfers if not t.overlaps) / bandwidth
    ring = (world - 1) / world if world > 1 else 0.0
    factors = {"all_gather": ring, "reduce_scatter": ring, "all_reduce": 2 * ring}
    tail = sum(b * factors[k] for k, b in exposed.items()) / bandwidth
    exposed_s = not_overlapped + tail
    step = max(compute + exposed_s, comm)
    return {
        "compute_seconds": compute,
        "communication_seconds": comm,
        "exposed_communication_seconds": exposed_s,
        "step_seconds": step,
        "bound_by": "communication"
        if comm > compute + exposed_s
        else "compute"
        if exposed_s < 0.05 * step
        else "compute+exposed",
        "link_gbps": bandwidth * 8 / 1e9,
        "link": "NVLink (one node)" if options.nodes == 1 else "NVLink + InfiniBand (rings across nodes)",
    }


def overlap_needed(compute: float, step: dict, target: float = 0.9) -> float | None:
    """Fraction of the overlappable communication that must hide behind compute for scaling efficiency
    `target` against one GPU; None when no overlap can reach it (the step must fit in compute / target,
    and all communication, and compute plus the exposed part, take longer than that)."""
    budget = compute / target
    exposed = step["exposed_communication_seconds"]
    overlappable = step["communication_seconds"] - exposed
    if step["communication_seconds"] > budget or compute + exposed > budget:
        return None
    if overlappable <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - (budget - compute - exposed) / overlappable))


def scaling(compute: float, node_step: dict, step: dict) -> dict:
    no_overlap = compute / (compute + step["communication_seconds"])
    return {
        "overlap_needed_for_90_percent": overlap_needed(compute, step),
        "vs_one_gpu_at_most": compute / step["step_seconds"],
        "vs_one_gpu_no_overlap": no_overlap,
        "one_node_vs_one_gpu_at_most": compute / node_step["step_seconds"],
        "one_node_step_seconds": node_step["step_seconds"],
        "nodes_vs_one_node_at_most": node_step["step_seconds"] / step["step_seconds"],
    }
