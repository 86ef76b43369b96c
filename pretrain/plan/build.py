"""One plan: the job at nodes x gpus_per_node ranks, from its config, in this one CPU process.

Assembles the pieces: per-rank state from the sharded shapes (fake_world, state_memory), activations and
method collectives (method_models), per-step communication (communication), a lower bound on step time
and the scaling efficiency it implies (timing), checkpoint sizes and resharding (checkpoint_plan), and
the data rate each node must decode.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.config import Config, ConfigError
from pretrain.flops import device_memory_bytes, peak_flops_by_name
from pretrain.methods.registry import flops_per_sample
from pretrain.plan import checkpoint_plan, communication, fake_world, method_models, state_memory, timing

DEFAULT_DECODE_RATE = 300.0  # images/s/core: PIL decode + crop + resize + normalize of a 500x375 JPEG (DESIGN.md)


@dataclass
class PlanOptions:
    nodes: int
    gpus_per_node: int
    device: str = "H100"
    mfu: float = 0.5
    intra_gbps: float = 3600.0  # per GPU, one direction: NVLink 4 (H100/H200), 450 GB/s
    inter_gbps: float = 400.0  # per GPU, one direction: one 400 Gb/s InfiniBand NIC per GPU
    decode_rate: float = DEFAULT_DECODE_RATE
    decode_rate_source: str = "default: PIL decode + augment of a 500x375 JPEG on one core, ~300 images/s (DESIGN.md)"
    load_world_sizes: tuple[int, ...] = ()  # checkpoint resharding checks; default: half and double

    def validate(self) -> None:
        for flag, value in [("--nodes", self.nodes), ("--gpus-per-node", self.gpus_per_node)]:
            if value < 1:
                raise ConfigError(f"{flag}: must be >= 1, got {value}")
        if not 0 < self.mfu <= 1:
            raise ConfigError(f"--mfu: must be in (0, 1], got {self.mfu}")
        for flag, value in [
            ("--intra-gbps", self.intra_gbps),
            ("--inter-gbps", self.inter_gbps),
            ("--decode-rate", self.decode_rate),
        ]:
            if value <= 0:
                raise ConfigError(f"{flag}: must be > 0, got {value}")
        if device_memory_bytes(self.device) is None or peak_flops_by_name(self.device) is None:
            raise ConfigError(f"--device: unknown device '{self.device}'; known: H100, H200, A100-40, A100-80")


def _precision(cfg: Config) -> str:
    return "fp32" if cfg.train.precision == "fp32" else "bf16"  # auto is bf16 on a GPU


def engine_label(cfg: Config) -> str:
    kind = cfg.engine.kind
    return f"deepspeed ZeRO-{cfg.engine.deepspeed.zero_stage}" if kind == "deepspeed" else kind


def rank_states(
    cfg: Config, records: list, world: int, param_bytes: int
) -> list[tuple[int, int, state_memory.RankState]]:
    """(first rank, last rank, state) for each run of ranks that hold the same bytes. FSDP's shards are
    uneven (torch.chunk of dim 0): a rank's bytes change only where some parameter's shard shrinks, and
    never grow with the rank, so rank 0 is the largest. ZeRO partitions and replicas are equal on every rank."""
    kind = cfg.engine.kind
    if kind == "fsdp":
        starts = sorted({0, *_fsdp_boundary_ranks(records, world)})
        ends = [s - 1 for s in starts[1:]] + [world - 1]
        return [
            (
                first,
                last,
                state_memory.fsdp_state(
                    records,
                    world,
                    first,
                    param_bytes,
                    param_bytes,
                    cfg.engine.fsdp.reshard_after_forward,
                    method_models.averaged_network_runs_forward(cfg),
                ),
            )
            for first, last in zip(starts, ends)
        ]
    if kind == "deepspeed":
        from pretrain.engines.deepspeed import bucket_sizes  # our engine's bucket rule (an eighth of the model, <= 5e8)

        bucket = bucket_sizes(sum(r.numel for r in records)).get("reduce_bucket_size", 0)
        return [
            (
                0,
                world - 1,
                state_memory.zero_state(records, world, cfg.engine.deepspeed.zero_stage, param_bytes, bucket),
            )
        ]
    return [(0, world - 1, state_memory.replicated_state(records, ddp=kind == "ddp"))]


def _fsdp_boundary_ranks(records: list, world: int) -> set[int]:
    """Ranks from which some parameter's shard is partial or empty (ceil(dim0 / W)-row chunks run out)."""
    out = set()
    for r in records:
        rows = r.shape[0] if r.shape else 1
        chunk = state_memory.ceil_div(rows, world)
        for first in (rows // chunk, state_memory.ceil_div(rows, chunk)):  # partial shard, then empty ones
            if 0 < first < world:
                out.add(first)
    return out


def engine_transfers(cfg: Config, records: list, world: int, param_bytes: int) -> tuple[list, dict]:
    """The engine's and the method's collectives of one step at `world` ranks, and the part that cannot overlap."""
    kind, accum = cfg.engine.kind, cfg.optim.accum_steps
    averaged_runs = method_models.averaged_network_runs_forward(cfg)
    if kind == "fsdp":
        transfers = communication.fsdp_transfers(
            records, world, accum, param_bytes, cfg.engine.fsdp.reshard_after_forward, averaged_runs
        )
        exposed = communication.exposed_block_bytes(records, world, param_bytes, 4)
    elif kind == "deepspeed":
        stage = cfg.engine.deepspeed.zero_stage
        transfers = communication.zero_transfers(records, stage, accum, param_bytes, averaged_runs)
        exposed = communication.exposed_block_bytes(records, world, param_bytes, param_bytes) if stage == 3 else {}
    elif kind == "ddp":
        transfers = communication.ddp_transfers(records)
        exposed = {"all_reduce": communication.DDP_BUCKET_BYTES}
    else:
        transfers, exposed = [], {}
    collectives = method_models.method_collectives(cfg, cfg.data.batch_size, param_bytes)
    return transfers + communication.method_transfers(collectives, accum), exposed


def make_plan(cfg: Config, options: PlanOptions) -> dict:
    options.validate()
    world = options.nodes * options.gpus_per_node
    precision = _precision(cfg)
    act = 2 if precision == "bf16" else 4
    param_bytes = act  # gathered / communicated parameter dtype: FSDP's param_dtype, DeepSpeed's bf16
    accum, micro = cfg.optim.accum_steps, cfg.data.batch_size
    kind = cfg.engine.kind
    if kind == "single" and world > 1:
        raise ConfigError(
            f"engine.kind: 'single' runs one process, but the plan has {world} ranks; choose ddp, fsdp or deepspeed"
        )

    if kind == "fsdp":
        records = fake_world.fsdp_records(cfg, world, rank=0)
        sharding = (
            "FSDP2 fully_shard per block and at the root, applied under a fake process group (torch 'fake' backend)"
        )
    else:
        records = fake_world.replicated_records(cfg)
        sharding = (
            "DeepSpeed ZeRO partitioning from its documented rules (DeepSpeed is not initialized: it would allocate the model)"
            if kind == "deepspeed"
            else "replicated on every rank"
        )
    states = rank_states(cfg, records, world, param_bytes)

    per_sample = method_models.activations_per_sample(cfg, act, cfg.engine.activation_checkpointing)
    per_sample_other = method_models.activations_per_sample(cfg, act, not cfg.engine.activation_checkpointing)
    activations = sum(per_sample.values()) * micro
    activations_other = sum(per_sample_other.values()) * micro

    capacity = device_memory_bytes(options.device)
    ranks = []
    for first, last, state in states:
        total = state.persistent + state.buffers + activations
        ranks.append(
            {
                "ranks": [first, last],
                **state.as_dict(),
                "activations": activations,
                "total": total,
                "fits": total <= capacity,
            }
        )
    worst = max(ranks, key=lambda r: r["total"])

    flops = flops_per_sample(cfg)
    compute = timing.compute_seconds(flops, cfg, options)
    transfers, exposed = engine_transfers(cfg, records, world, param_bytes)
    step = timing.step_bound(compute, transfers, exposed, world, options)
    one_node = options.gpus_per_node
    node_step = timing.step_bound(
        compute, *engine_transfers(cfg, records, one_node, param_bytes), one_node, replace(options, nodes=1)
    )
    scaling = timing.scaling(compute, node_step, step)
    images_per_step = micro * accum * world
    images_per_node = images_per_step / step["step_seconds"] / options.nodes

    return {
        "mfu": options.mfu,
        "options": {k: v for k, v in vars(options).items()},
        "config": {
            "method": cfg.method.name,
            "engine": engine_label(cfg),
            "precision": precision,
            "activation_checkpointing": cfg.engine.activation_checkpointing,
            "micro_batch": micro,
            "accum_steps": accum,
            "global_batch": images_per_step,
        },
        "world": {
            "nodes": options.nodes,
            "gpus_per_node": options.gpus_per_node,
            "world_size": world,
            "device": options.device,
            "device_memory_bytes": capacity,
        },
        "sharding": sharding,
        "parameters": {
            "total": sum(r.numel for r in records),
            "trained": sum(r.numel for r in records if r.requires_grad),
            "tensors": len(records),
        },
        "memory": {
            "ranks": ranks,
            "worst_ranks": worst["ranks"],
            "fits": all(r["fits"] for r in ranks),
            "activations_per_sample": per_sample,
            "activations_per_micro_batch": activations,
            "activations_per_micro_batch_other_checkpointing": activations_other,
            "not_included": "CUDA context, NCCL buffers, allocator fragmentation and the caching allocator's reserve",
        },
        "communication": {"transfers": [t.as_dict(world) for t in transfers], "exposed_bytes": exposed},
        "flops_per_sample": flops,
        "step": step,
        "scaling": scaling,
        "checkpoint": checkpoint_plan.checkpoint(cfg, records, world, options.load_world_sizes),
        "data": {
            "images_per_step": images_per_step,
            "images_per_second_per_node": images_per_node,
            "decode_rate_per_core": options.decode_rate,
            "decode_rate_source": options.decode_rate_source,
            "cores_per_node": images_per_node / options.decode_rate,
            "note": "DiT on latent shards reads .npy latents, not JPEGs: the JPEG decode rate does not apply"
            if cfg.method.name in ("dit", "dit_distill") and cfg.method.dit.space == "latent"
            else "one decode per image; multi-view methods crop and resize each view, so their per-core rate is lower",
        },
    }
