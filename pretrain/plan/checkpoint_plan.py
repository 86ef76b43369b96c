"""Checkpoint size per rank and in total, and whether a DCP checkpoint saved at this world size loads at others.

DCP (single, ddp, fsdp) stores each tensor as the chunks its ranks hold, keyed by parameter name: fp32
parameters and AdamW's exp_avg and exp_avg_sq (plus a scalar step per parameter). Under FSDP2 a rank's
chunk is its dim-0 shard (ceil(dim0 / W) rows, fewer or none at the end), written without padding;
replicated tensors (DDP, and the steps) are written once, by whichever rank DCP's deduplication gives
them to (it balances bytes across the ranks that hold a copy).

The resharding check is the planning half of a DCP load, on shapes only: the chunks saved at W must tile
every tensor exactly (what DCP's global save plan guarantees), and every chunk a rank requests at the new
world size must be covered by saved chunks; it also says how many saved chunks (reads) and bytes the
busiest loading rank needs. For FSDP, DCP's own load planner (create_default_local_load_plan) then runs
for rank 0 of the new world size, built under a fake process group, against the saved metadata. DeepSpeed's native checkpoints are per-rank partitions: at another world size
or stage they are converted to DeepSpeed's universal format first (pretrain/engines/zero.py), which is
not planned here.
"""

from __future__ import annotations

import heapq

import torch

from pretrain.config import Config
from pretrain.plan.fake_world import ParamRecord
from pretrain.plan.state_memory import ZERO_K, ceil_div

FP32 = 4


def _rows(record: ParamRecord) -> tuple[int, int]:
    rows = record.shape[0] if record.shape else 1
    return rows, record.numel // max(rows, 1)


def _chunks(rows: int, world: int, sharded: bool) -> list[tuple[int, int]]:
    """[start, end) row ranges each rank holds (empty ranges dropped)."""
    if not sharded:
        return [(0, rows)]
    size = ceil_div(rows, world)
    return [(r * size, min(rows, (r + 1) * size)) for r in range(world) if r * size < rows]


def _tensors(records: list[ParamRecord]) -> list[tuple[str, ParamRecord]]:
    """Every tensor DCP writes (besides steps): the parameter, and Adam's two moments of a trained one."""
    out = []
    for r in records:
        out.append((f"model.{r.name}", r))
        if r.requires_grad:
            out += [(f"optim.state.{r.name}.exp_avg", r), (f"optim.state.{r.name}.exp_avg_sq", r)]
    return out


def dcp_bytes_per_rank(records: list[ParamRecord], world: int, sharded: bool) -> list[int]:
    """Bytes each rank writes. Sharded tensors: each rank its chunk; replicated ones (and the steps):
    greedily to the least-loaded rank, largest first, as DCP's dedup balances them."""
    load = [0] * world
    replicated = []
    for _, record in _tensors(records):
        rows, per_row = _rows(record)
        if sharded:
            for rank, (start, end) in enumerate(_chunks(rows, world, True)):
                load[rank] += (end - start) * per_row * FP32
        else:
            replicated.append(record.numel * FP32)
    replicated += [FP32] * sum(1 for r in records if r.requires_grad)  # steps: plain tensors on every rank
    heap = [(b, rank) for rank, b in enumerate(load)]
    heapq.heapify(heap)
    for size in sorted(replicated, reverse=True):
        b, rank = heapq.heappop(heap)
        load[rank] = b + size
        heapq.heappush(heap, (b + size, rank))
    return load


def reshard_check(records: list[ParamRecord], save_world: int, load_world: int, sharded: bool) -> dict:
    """Does a DCP checkpoint of this model saved at `save_world` load at `load_world` (same engine)?"""
    problems = []
    reads = [0] * load_world
    read_bytes = [0] * load_world
    for key, record in _tensors(records):
        rows, per_row = _rows(record)
        saved = _chunks(rows, save_world, sharded)
        if saved[0][0] != 0 or saved[-1][1] != rows or any(a[1] != b[0] for a, b in zip(saved, saved[1:])):
            problems.append(f"{key}: saved chunks do not tile [0, {rows})")
            continue
        size = saved[0][1] - saved[0][0]
        requests = _chunks(rows, load_world, sharded) if sharded else [(0, rows)] * load_world
        for rank, (start, end) in enumerate(requests):
            if end > rows:
                problems.append(f"{key}: rank {rank} requests rows up to {end} of {rows}")
            first, last = start // size, (end - 1) // size
            reads[rank] += last - first + 1 if sharded else 1
            read_bytes[rank] += (end - start) * per_row * FP32
    max_reads, max_bytes = max(reads), max(read_bytes)
    return {
        "load_world_size": load_world,
        "loads": not problems,
        "problems": problems[:10],
        "max_chunks_read_by_a_rank": max_reads,
        "max_bytes_read_by_a_rank": max_bytes,
    }


def saved_metadata(records: list[ParamRecord], world: int, sharded: bool):
    """DCP's checkpoint metadata for the model's tensors as `world` ranks would save them (no data)."""
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        TensorProperties,
        TensorStorageMetadata,
    )

    entries = {}
    for r in records:
        rows, _ = _rows(r)
        rest = list(r.shape[1:])
        chunks = [
            ChunkStorageMetadata(torch.Size([start] + [0] * len(rest)), torch.Size([end - start] + rest))
            for start, end in _chunks(rows, world, sharded)
        ]
        entries[r.name] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), torch.Size(r.shape), chunks)
    return Metadata(state_dict_metadata=entries)


def dcp_load_plan(cfg: Config, records: list[ParamRecord], save_world: int, load_world: int) -> int:
    """Read items DCP's own load planner makes for rank 0 of an FSDP job at `load_world` ranks (built under
    a fake process group) from the metadata of a save at `save_world`: the model's tensors (Adam's
    moments are sharded the same way). It raises if a tensor is missing or its size differs."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    from pretrain.plan.fake_world import fake_process_group, fsdp_wrap, plain_name

    metadata = saved_metadata(records, save_world, sharded=True)
    with fake_process_group(load_world, 0):
        method = fsdp_wrap(cfg, load_world)
        state = {
            plain_name(k): v for k, v in method.state_dict().items() if plain_name(k) in metadata.state_dict_metadata
        }
        if len(state) != len(records):
            raise RuntimeError(f"the model at {load_world} ranks has {len(state)} of the {len(records)} saved tensors")
        return len(create_default_local_load_plan(state, metadata).items)


def checkpoint(cfg: Config, records: list[ParamRecord], world: int, load_world_sizes: tuple[int, ...]) -> dict:
    kind = cfg.engine.kind
    trained = [r for r in records if r.requires_grad]
    if kind == "deepspeed":
        stage = cfg.engine.deepspeed.zero_stage
        param_bytes = 4 if cfg.train.precision == "fp32" else 2
        if stage == 3:
            partition = sum(ceil_div(r.numel, world) for r in trained)
            model_rank0 = 0
        else:
            partition = ceil_div(sum(r.numel for r in trained), world)
            model_rank0 = sum(r.numel for r in records) * param_bytes  # rank 0 writes the module's state dict
        per_rank = partition * ZERO_K
        return {
            "format": "deepspeed",
            "bytes_total": per_rank * world + model_rank0,
            "bytes_per_rank_max": per_rank + model_rank0,
            "bytes_per_rank_min": per_rank,
            "files": "each rank: its fp32 master + Adam partition (12 bytes/element); stage 1/2: rank 0 also the module's weights",
            "other_world_sizes": "converted to DeepSpeed's universal format on load (pretrain/engines/zero.py); not planned here",
        }
    sharded = kind == "fsdp"
    per_rank = dcp_bytes_per_rank(records, world, sharded)
    sizes = load_world_sizes or tuple(sorted({max(1, world // 2), world * 2}))
    return {
        "format": "dcp",
        "bytes_total": sum(per_rank),
        "bytes_per_rank_max": max(per_rank),
        "bytes_per_rank_min": min(per_rank),
        "reshard": [_with_dcp_planner(cfg, records, world, m, sharded) for m in sizes],
    }


def _with_dcp_planner(cfg: Config, records: list[ParamRecord], world: int, load_world: int, sharded: bool) -> dict:
    """The shape-level check, and for FSDP DCP's own load planner on rank 0 at the new world size."""
    check = reshard_check(records, world, load_world, sharded)
    if sharded:
        check["dcp_planner_rank0_model_read_items"] = dcp_load_plan(cfg, records, world, load_world)
        # rank 0 loads rows [0, end) and reads every saved chunk of ceil(rows / W) rows they overlap
        ends = [min(_rows(r)[0], ceil_div(_rows(r)[0], load_world)) for r in records]
        check["rank0_model_chunks"] = sum(ceil_div(end, ceil_div(_rows(r)[0], world)) for r, end in zip(records, ends))
    return check
