"""`pretrain launch local|slurm|accelerate` and `pretrain status`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pretrain.plan.cli import add_plan_options

# launch slurm flag -> [launch] config key. Flags become `--set launch.KEY=VALUE` overrides, so they are
# validated like the config file (the error names the key) and the job's own config records them.
SLURM_FLAGS = {
    "nodes": int,
    "gpus_per_node": int,
    "nproc_per_node": int,
    "cpus_per_task": int,
    "partition": str,
    "time": str,
    "account": str,
    "qos": str,
    "constraint": str,
    "launcher": str,
    "max_restarts": int,
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="TOML file, e.g. configs/mae_vit_tiny_digits.toml")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )


def slurm_overrides(args: argparse.Namespace) -> list[str]:
    extra = []
    for key, kind in SLURM_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            extra.append(f"launch.{key}={json.dumps(value) if kind is str else value}")
    return [*args.overrides, *extra]


def cmd_local(args: argparse.Namespace) -> int:
    from launch.local import launch_local

    return launch_local(args.config, args.overrides, args.nproc)


def cmd_accelerate(args: argparse.Namespace) -> int:
    from launch.accelerate import launch_accelerate

    return launch_accelerate(args.config, args.overrides, args.nproc, deepspeed=args.deepspeed)


def cmd_slurm(args: argparse.Namespace) -> int:
    from launch.slurm import render_script, submit, write_script
    from pretrain.recipes import load_config

    overrides = slurm_overrides(args)
    cfg = load_config(args.config, overrides)
    if args.plan:
        from pretrain.config import ConfigError
        from pretrain.plan.cli import run_plan

        if not cfg.launch.gpus_per_node:
            raise ConfigError("--plan: plans GPU jobs; set --gpus-per-node (launch.gpus_per_node)")
        code = run_plan(args.config, overrides, args, cfg.launch.nodes, cfg.launch.gpus_per_node)
        if code != 0:
            print("not submitted: the plan says a rank would not fit", file=sys.stderr)
            return code
    script = render_script(cfg, Path(args.config), overrides)
    if args.dry_run:
        print(script, end="")
        return 0
    path = write_script(cfg, script)
    job_id = submit(path)
    print(f"submitted job {job_id}; script {path}; output {path.parent}/job-{job_id}.out")
    print(f"follow it with: pretrain status {cfg.run_dir}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from launch.status import format_status, run_status

    status = run_status(args.run_dir)
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    launch = commands.add_parser("launch", help="start training: torchrun here, a SLURM job, or accelerate")
    kinds = launch.add_subparsers(dest="launch_command", required=True)

    local = kinds.add_parser("local", help="torchrun on this machine, logs per rank in the run directory")
    _add_config_args(local)
    local.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    local.set_defaults(func=cmd_local)

    slurm = kinds.add_parser("slurm", help="write an sbatch script into the run directory and submit it")
    _add_config_args(slurm)
    slurm.add_argument("--nodes", type=int)
    slurm.add_argument("--gpus-per-node", type=int, help="0: CPU processes, --nproc-per-node of them")
    slurm.add_argument("--nproc-per-node", type=int, help="processes per node without GPUs")
    slurm.add_argument("--cpus-per-task", type=int)
    slurm.add_argument("--partition")
    slurm.add_argument("--time", help="time limit, HH:MM:SS or D-HH:MM:SS")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--constraint")
    slurm.add_argument("--launcher", choices=("torchrun", "srun"), help="one torchrun per node, or srun per process")
    slurm.add_argument("--max-restarts", type=int, help="torchrun restarts within the allocation")
    slurm.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    slurm.add_argument(
        "--plan",
        action="store_true",
        help="plan the job first (pretrain plan); with --fail-over-memory, submit only if it fits",
    )
    add_plan_options(slurm)
    slurm.set_defaults(func=cmd_slurm)

    accelerate = kinds.add_parser("accelerate", help="accelerate launch with a generated config")
    _add_config_args(accelerate)
    accelerate.add_argument("--nproc", type=int, default=1, help="processes on this machine")
    accelerate.add_argument(
        "--deepspeed", action="store_true", help="accelerate's DeepSpeed type, engine.kind=deepspeed"
    )
    accelerate.set_defaults(func=cmd_accelerate)

    status = commands.add_parser("status", help="latest checkpoint, MLflow run and SLURM job of a run")
    status.add_argument("run_dir")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
