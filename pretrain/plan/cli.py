"""`pretrain plan CONFIG --nodes N --gpus-per-node G`: will this job fit, and how fast can it go?"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.config import ConfigError
from pretrain.recipes import load_config


def add_plan_options(parser: argparse.ArgumentParser) -> None:
    """Flags shared by `pretrain plan` and `pretrain launch slurm --plan`."""
    parser.add_argument(
        "--device", default="H100", help="H100 (80 GB), H200 (141 GB), A100-40 or A100-80 (default H100)"
    )
    parser.add_argument(
        "--mfu", type=float, default=0.5, help="model FLOPs utilization assumed for compute (default 0.5)"
    )
    parser.add_argument(
        "--intra-gbps",
        type=float,
        default=3600.0,
        help="per-GPU bandwidth inside a node, Gb/s one direction (default 3600: NVLink 4, 450 GB/s)",
    )
    parser.add_argument(
        "--inter-gbps",
        type=float,
        default=400.0,
        help="InfiniBand bandwidth per GPU, Gb/s: the node's NIC bandwidth / GPUs per node "
        "(default 400: one NDR NIC per GPU)",
    )
    parser.add_argument(
        "--decode-rate",
        type=float,
        default=None,
        help="images/s one CPU core decodes and augments (default 300, PIL on a 500x375 JPEG)",
    )
    parser.add_argument(
        "--load-world-sizes",
        default="",
        help="comma-separated world sizes to check checkpoint loading at (default: half and double)",
    )
    parser.add_argument(
        "--engines",
        default="",
        help="comma-separated engines to plan: ddp, fsdp, zero1, zero2, zero3 or all (default: the config's)",
    )
    parser.add_argument("--plan-out", default="", help="plan JSON path (default: next to the run directory)")
    parser.add_argument(
        "--fail-over-memory",
        action="store_true",
        help="exit 3 when a rank would not fit in device memory, naming the ranks and bytes",
    )


def plan_options(args: argparse.Namespace, nodes: int, gpus_per_node: int):
    from pretrain.plan.build import DEFAULT_DECODE_RATE, PlanOptions

    try:
        sizes = tuple(int(x) for x in args.load_world_sizes.split(",") if x.strip())
    except ValueError:
        raise ConfigError(
            f"--load-world-sizes: expected comma-separated integers, got '{args.load_world_sizes}'"
        ) from None
    if any(n < 1 for n in sizes):
        raise ConfigError(f"--load-world-sizes: world sizes must be >= 1, got '{args.load_world_sizes}'")
    rate = args.decode_rate if args.decode_rate is not None else DEFAULT_DECODE_RATE
    source = "--decode-rate" if args.decode_rate is not None else PlanOptions.decode_rate_source
    return PlanOptions(
        nodes=nodes,
        gpus_per_node=gpus_per_node,
        device=args.device,
        mfu=args.mfu,
        intra_gbps=args.intra_gbps,
        inter_gbps=args.inter_gbps,
        decode_rate=rate,
        decode_rate_source=source,
        load_world_sizes=sizes,
    )


# --engines names -> config overrides
ENGINES = {
    "ddp": ["engine.kind=ddp"],
    "fsdp": ["engine.kind=fsdp"],
    "zero1": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=1"],
    "zero2": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=2"],
    "zero3": ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"],
}


def engine_overrides(text: str, cfg, world: int) -> list[list[str]]:
    """Override sets, one per engine to plan: --engines, else the config's own engine, else (a `single`
    config at more than one rank, which cannot run) every distributed engine."""
    if text:
        names = [n.strip() for n in text.split(",") if n.strip()]
        names = list(ENGINES) if names == ["all"] else names
        unknown = [n for n in names if n not in ENGINES]
        if unknown:
            raise ConfigError(f"--engines: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)} or all")
        return [ENGINES[n] for n in names]
    if cfg.engine.kind == "single" and world > 1:
        return list(ENGINES.values())
    return [[]]


def default_plan_path(cfg, nodes: int, gpus_per_node: int, device: str) -> Path:
    return Path(cfg.run.output_dir) / f"{cfg.run.name}.plan-{nodes}x{gpus_per_node}-{device}.json"


def run_plan(config: str, overrides: list[str], args: argparse.Namespace, nodes: int, gpus_per_node: int) -> int:
    """Print the plan(s), write the JSON; with --fail-over-memory, 3 when a rank would not fit."""
    from pretrain.plan.build import make_plan
    from pretrain.plan.report import format_plan, format_summary, over_memory

    options = plan_options(args, nodes, gpus_per_node)
    cfg = load_config(config, overrides)
    world = nodes * gpus_per_node
    engine_sets = engine_overrides(args.engines, cfg, world)
    if cfg.engine.kind == "single" and world > 1 and not args.engines:
        print(
            f"plan: engine.kind is 'single', which runs one process; planning every distributed engine at {world} ranks"
        )
    plans = [make_plan(load_config(config, [*overrides, *extra]), options) for extra in engine_sets]
    path = Path(args.plan_out) if args.plan_out else default_plan_path(cfg, nodes, gpus_per_node, options.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plans[0] if len(plans) == 1 else {"plans": plans}, indent=2) + "\n")
    print(format_plan(plans[0]) if len(plans) == 1 else format_summary(plans))
    print(f"plan written to {path}")
    failing = [f"{p['config']['engine']}: {line}" for p in plans for line in over_memory(p)]
    if failing and args.fail_over_memory:
        print("plan: does not fit in device memory:\n  " + "\n  ".join(failing), file=sys.stderr)
        return 3
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    return run_plan(args.config, args.overrides, args, args.nodes, args.gpus_per_node)


def register(commands: argparse._SubParsersAction) -> None:
    plan = commands.add_parser(
        "plan", help="plan a job at N nodes x G GPUs in one CPU process: memory, communication, step time"
    )
    plan.add_argument("config", help="TOML file, e.g. configs/mae_vit_b16.toml")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--nodes", type=int, required=True)
    plan.add_argument("--gpus-per-node", type=int, required=True)
    add_plan_options(plan)
    plan.set_defaults(func=cmd_plan)
