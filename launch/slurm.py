"""`pretrain launch slurm`: render an sbatch script into the run directory and submit it.

Inside the job, one srun task per node runs torchrun with a c10d rendezvous on the allocation's
first node (or, with launcher=srun, one task per process and ranks from SLURM's environment).

Preemption and time limits: `#SBATCH --signal=B:USR1@<lead>` makes SLURM signal only the batch
shell. Signalling every process of the job instead would hit the torchrun agents, which have no
USR1 handler and would die before their workers could checkpoint. The shell forwards USR1 to the
training step (torchrun is started with USR1 ignored, its workers catch it), the workers agree on a
step, checkpoint and exit, and the shell requeues the job, which resumes from that checkpoint into
the same MLflow run. scancel's SIGTERM reaches every process of the job; the workers checkpoint then
if they can within SLURM's KillWait (and torchrun's 30 s shutdown grace).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pretrain.config import Config
from pretrain.runtime.preemption import PREEMPTED_EXIT_CODE

SCRIPT_NAME = "job.sbatch"
RECORD_NAME = "job.json"


def slurm_dir(run_dir: Path) -> Path:
    return Path(run_dir).resolve() / "slurm"


def _sbatch_options(cfg: Config, out_dir: Path, workdir: Path) -> list[str]:
    launch = cfg.launch
    per_node = launch.gpus_per_node or launch.nproc_per_node
    options = [
        f"--job-name={cfg.run.name}",
        f"--nodes={launch.nodes}",
        f"--ntasks-per-node={1 if launch.launcher == 'torchrun' else per_node}",
    ]
    if launch.gpus_per_node:
        options.append(f"--gpus-per-node={launch.gpus_per_node}")
    if launch.cpus_per_task:
        options.append(f"--cpus-per-task={launch.cpus_per_task}")
    for name in ("partition", "time", "account", "qos", "constraint"):
        if value := getattr(launch, name):
            options.append(f"--{name}={value}")
    options += [f"--chdir={workdir}", f"--output={out_dir}/job-%j.out", "--open-mode=append"]
    options.append("--requeue" if launch.requeue else "--no-requeue")
    if launch.signal_lead:
        options.append(f"--signal=B:USR1@{launch.signal_lead}")
    return options


def _train_command(config_path: Path, overrides: list[str], python: str) -> list[str]:
    sets = [item for override in overrides for item in ("--set", override)]
    return [python, "-m", "pretrain.cli", "train", str(config_path), *sets]


def _step_command(cfg: Config, train: list[str], python: str) -> str:
    """The srun line of the training step."""
    launch = cfg.launch
    per_node = launch.gpus_per_node or launch.nproc_per_node
    srun = 'srun --label --kill-on-bad-exit=1 --nodes="$SLURM_JOB_NUM_NODES"'
    if launch.launcher == "srun":
        return f"{srun} --ntasks-per-node={per_node} \\\n    {shlex.join(train)}"
    torchrun = (
        f'{shlex.quote(python)} -m torch.distributed.run --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node={per_node} '
        '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" '
        f"--max-restarts={launch.max_restarts}"
    )
    # torchrun starts with USR1 ignored (kept across exec); its workers install their own handler.
    ignore_usr1 = 'bash -c \'trap "" USR1; exec "$@"\' torchrun'
    return f"{srun} --ntasks-per-node=1 \\\n    {ignore_usr1} \\\n    {torchrun} \\\n    {shlex.join(train[1:])}"


def render_script(
    cfg: Config, config_path: Path, overrides: list[str], python: str = sys.executable, workdir: Path | None = None
) -> str:
    """The batch script for this config (already validated, `--set` overrides applied)."""
    launch = cfg.launch
    out_dir = slurm_dir(cfg.run_dir)
    workdir = Path(workdir or Path.cwd()).resolve()
    train = _train_command(Path(config_path).resolve(), overrides, python)
    lines = [
        "#!/bin/bash",
        f"# Written by `pretrain launch slurm` for run {cfg.run_dir}; resubmit with: sbatch {out_dir / SCRIPT_NAME}",
        *(f"#SBATCH {option}" for option in _sbatch_options(cfg, out_dir, workdir)),
        "",
        "set -uo pipefail",
        "export PYTHONUNBUFFERED=1",
        *(f"export {name}={shlex.quote(value)}" for name, value in sorted(launch.env.items())),
        'echo "[launch] job $SLURM_JOB_ID, restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST, $(date -Is)"',
        "",
        "# Rendezvous on the allocation's first node, at the address SLURM reaches it by (NodeAddr, usually",
        "# the node name). The port comes from the job id; +restart count, so a requeued run never waits on",
        "# the previous run's socket.",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        'head_addr=$(scontrol show node "$head_node" | sed -n "s/.*NodeAddr=\\([^ ]*\\).*/\\1/p")',
        'export MASTER_ADDR="${head_addr:-$head_node}"',
        "export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 4 + ${SLURM_RESTART_COUNT:-0}) % 20000 ))",
        "",
        "# USR1 (SLURM's warning before the time limit, or `scancel --batch --signal=USR1`): forward it to",
        "# the training step; its processes checkpoint at the next step boundary and exit.",
        "stop_requested=0",
        'trap \'stop_requested=1; echo "[launch] USR1: checkpointing and stopping"; scancel --signal=USR1 "$SLURM_JOB_ID"\' USR1',
        "# SIGTERM (scancel, end of the time limit) reaches the training processes directly: keep waiting",
        "# for them so they can checkpoint within KillWait.",
        "trap 'echo \"[launch] SIGTERM: training processes checkpoint if time allows\"' TERM",
        "",
        _step_command(cfg, train, python) + " &",
        "train_pid=$!",
        "while true; do",
        '    wait "$train_pid"; status=$?',
        '    kill -0 "$train_pid" 2>/dev/null || break  # still running: wait was cut short by a signal',
        "done",
        'echo "[launch] training exited with status $status"',
    ]
    if launch.requeue:
        lines += [
            f'if [ "$stop_requested" = 1 ] || [ "$status" = {PREEMPTED_EXIT_CODE} ]; then',
            '    echo "[launch] requeueing job $SLURM_JOB_ID: it resumes from the latest checkpoint"',
            '    scontrol requeue "$SLURM_JOB_ID"',
            "fi",
        ]
    lines.append('exit "$status"')
    return "\n".join(lines) + "\n"


def write_script(cfg: Config, script: str) -> Path:
    out_dir = slurm_dir(cfg.run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SCRIPT_NAME
    path.write_text(script)
    path.chmod(0o755)
    return path


def submit(script_path: Path) -> str:
    """`sbatch` the script; returns the job id."""
    out = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    job_id = out.stdout.strip().split(";")[0]
    record = {
        "job_id": job_id,
        "script": str(script_path),
        "output": str(script_path.parent / f"job-{job_id}.out"),
        "submitted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slurm_conf": os.environ.get("SLURM_CONF", ""),
    }
    (script_path.parent / RECORD_NAME).write_text(json.dumps(record, indent=2) + "\n")
    return job_id
