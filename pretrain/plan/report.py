"""The plan as a terminal table, and the memory verdict a SLURM script can act on."""

from __future__ import annotations

GIB = 2**30


def gib(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1 (GiB at most)."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


rate = gib


def _ranks(pair: list[int]) -> str:
    return f"rank {pair[0]}" if pair[0] == pair[1] else f"ranks {pair[0]}-{pair[1]}"


def format_plan(plan: dict) -> str:
    c, w, m, s, sc, ck, d = (plan[k] for k in ("config", "world", "memory", "step", "scaling", "checkpoint", "data"))
    lines = [
        f"plan: {c['method']} on {w['nodes']} node(s) x {w['gpus_per_node']} {w['device']} = {w['world_size']} ranks, "
        f"{c['engine']}, {c['precision']}, activation checkpointing {'on' if c['activation_checkpointing'] else 'off'}",
        f"  batch {c['micro_batch']}/rank x {c['accum_steps']} accumulation = {c['global_batch']} per step; "
        f"{plan['parameters']['total'] / 1e6:.1f}M parameters ({plan['parameters']['trained'] / 1e6:.1f}M trained)",
        f"  sharding: {plan['sharding']}",
        "",
        f"memory per rank (device {gib(w['device_memory_bytes'])})",
        f"  {'ranks':<16}{'params':>12}{'grads':>12}{'optimizer':>12}{'buffers':>12}{'activations':>13}{'total':>12}  fits",
    ]
    for r in m["ranks"]:
        lines.append(
            f"  {_ranks(r['ranks']):<16}{gib(r['params']):>12}{gib(r['grads']):>12}{gib(r['optimizer']):>12}"
            f"{gib(r['buffers']):>12}{gib(r['activations']):>13}{gib(r['total']):>12}  {'yes' if r['fits'] else 'NO'}"
        )
    other = "off" if c["activation_checkpointing"] else "on"
    lines += [
        f"  activations per micro-batch with checkpointing {other}: {gib(m['activations_per_micro_batch_other_checkpointing'])}",
        f"  not included: {m['not_included']}",
        "",
        "communication per step (per rank; wire = what a ring moves)",
    ]
    for t in plan["communication"]["transfers"]:
        if t["bytes_per_step"]:
            lines.append(
                f"  {t['kind']:<15}{rate(t['bytes_per_step']):>12} payload {rate(t['wire_bytes_per_step']):>12} wire  "
                f"{'overlapped' if t['overlaps'] else 'exposed   '}  {t['name']}"
            )
    lines += [
        "",
        f"step time lower bound at MFU {plan.get('mfu', 0):.2f}, {s['link']}: bus bandwidth {s['link_gbps']:.0f} Gb/s per GPU",
        f"  compute {s['compute_seconds'] * 1e3:.1f} ms, communication {s['communication_seconds'] * 1e3:.1f} ms "
        f"(exposed {s['exposed_communication_seconds'] * 1e3:.1f} ms): step >= {s['step_seconds'] * 1e3:.1f} ms, "
        f"{s['bound_by']}-bound",
        f"  scaling efficiency vs 1 GPU: at most {sc['vs_one_gpu_at_most']:.1%} "
        f"({sc['vs_one_gpu_no_overlap']:.1%} if nothing overlaps; 90% needs "
        f"{_overlap(sc['overlap_needed_for_90_percent'])} of the overlappable communication hidden)"
        + (
            f"; 1 node: at most {sc['one_node_vs_one_gpu_at_most']:.1%}; "
            f"1 node -> {w['nodes']}: at most {sc['nodes_vs_one_node_at_most']:.1%}"
            if w["nodes"] > 1
            else ""
        ),
        "",
        f"checkpoint ({ck['format']}): {gib(ck['bytes_total'])} in all, "
        f"{gib(ck['bytes_per_rank_min'])}-{gib(ck['bytes_per_rank_max'])} per rank",
    ]
    for r in ck.get("reshard", []):
        verdict = "loads" if r["loads"] else "DOES NOT LOAD: " + "; ".join(r["problems"])
        dcp = (
            f"; DCP's load planner, rank 0: {r['dcp_planner_rank0_model_read_items']} reads of model tensors"
            if "dcp_planner_rank0_model_read_items" in r
            else ""
        )
        lines.append(
            f"  at {r['load_world_size']} ranks: {verdict} (busiest rank reads {r['max_chunks_read_by_a_rank']} chunks, "
            f"{gib(r['max_bytes_read_by_a_rank'])}{dcp})"
        )
    if "other_world_sizes" in ck:
        lines.append(f"  other world sizes: {ck['other_world_sizes']}")
    lines += [
        "",
        f"data: {d['images_per_second_per_node']:,.0f} images/s per node at that step time; "
        f"{d['cores_per_node']:.1f} cores per node at {d['decode_rate_per_core']:.0f} images/s/core ({d['decode_rate_source']})",
        f"  {d['note']}",
    ]
    return "\n".join(lines)


def over_memory(plan: dict) -> list[str]:
    """One line per run of ranks that would not fit: ranks, bytes needed, bytes available."""
    capacity = plan["world"]["device_memory_bytes"]
    return [
        f"{_ranks(r['ranks'])}: need {r['total']:,} bytes ({gib(r['total'])}), device has {capacity:,} ({gib(capacity)})"
        for r in plan["memory"]["ranks"]
        if not r["fits"]
    ]


def _overlap(fraction: float | None) -> str:
    return "unreachable" if fraction is None else f"{fraction:.0%}"


def format_summary(plans: list[dict]) -> str:
    """One row per engine: does it fit, what bounds its step, how well it can scale."""
    w = plans[0]["world"]
    c = plans[0]["config"]
    lines = [
        f"plan: {c['method']} on {w['nodes']} node(s) x {w['gpus_per_node']} {w['device']} = {w['world_size']} ranks, "
        f"batch {c['micro_batch']}/rank x {c['accum_steps']} = {c['global_batch']} per step, {c['precision']}, "
        f"MFU {plans[0]['mfu']:.2f}",
        f"  {'engine':<20}{'largest rank':>14}{'of which state':>16}{'activations':>13}  fits{'step >=':>11}  "
        f"{'bound by':<15}{'efficiency vs 1 GPU: at most':>29}{'no overlap':>12}{'overlap for 90%':>17}"
        + (f"{'1 node -> N':>13}" if w["nodes"] > 1 else ""),
    ]
    for plan in plans:
        worst = max(plan["memory"]["ranks"], key=lambda r: r["total"])
        s, sc = plan["step"], plan["scaling"]
        lines.append(
            f"  {plan['config']['engine']:<20}{gib(worst['total']):>14}{gib(worst['persistent']):>16}"
            f"{gib(worst['activations']):>13}  {'yes ' if worst['fits'] else 'NO  '}{s['step_seconds'] * 1e3:>8.1f} ms  "
            f"{s['bound_by']:<15}{sc['vs_one_gpu_at_most']:>29.1%}{sc['vs_one_gpu_no_overlap']:>12.1%}"
            f"{_overlap(sc['overlap_needed_for_90_percent']):>17}"
            + (f"{sc['nodes_vs_one_node_at_most']:>13.1%}" if w["nodes"] > 1 else "")
        )
    return "\n".join(lines)
