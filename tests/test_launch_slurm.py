"""`pretrain launch slurm` against a real two-node SLURM cluster on this host: a 2-node job (one
CPU process per node, gloo) is signalled mid-run the way SLURM warns before a time limit, checkpoints,
requeues itself, resumes, and ends with the losses and weights of an uninterrupted run, in one MLflow
run. The dry-run script and `pretrain status` are checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from launch.status import format_status, run_status
from pretrain.cli import main
from pretrain.tracking.worker import JOB_KEY_TAG

from slurm_cluster import missing_programs, slurm_cluster
from tiny import assert_equal_states, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/mae_vit_tiny_digits.toml"
STEPS = 40  # long enough (about 0.15 s a step) that the stop lands mid-run


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    if missing := missing_programs():
        pytest.skip(f"SLURM programs missing ({', '.join(missing)}): apt-get install slurmctld slurmd slurm-client")
    with slurm_cluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def _sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def _pretrain(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "pretrain.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _tensors(checkpoint: Path, out: Path) -> dict:
    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


def _wait(condition, timeout: float, what: str, details=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")
        time.sleep(0.2)


def test_dry_run_prints_rendezvous_signal_and_requeue(tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(
        CONFIG.read_text()
        + '\n[launch]\nnodes = 4\ngpus_per_node = 8\npartition = "gpu"\ntime = "12:00:00"\nmax_restarts = 2\n'
        + '[launch.env]\nNCCL_SOCKET_IFNAME = "ib0"\nNCCL_IB_HCA = "mlx5"\n'
    )
    args = ["launch", "slurm", str(recipe), "--nodes", "2", "--time", "01:00:00", "--account", "proj", "--dry-run"]
    assert main([*args, "--set", f'run.output_dir="{tmp_path}"']) == 0
    script = capsys.readouterr().out
    for line in [
        "#SBATCH --nodes=2",  # the flag overrides the recipe
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",  # the recipe's value stays
        "#SBATCH --partition=gpu",
        "#SBATCH --time=01:00:00",
        "#SBATCH --account=proj",
        "#SBATCH --requeue",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        f"#SBATCH --output={tmp_path.resolve()}/mae_vit_tiny_digits/slurm/job-%j.out",
        "export NCCL_IB_HCA=mlx5",
        "export NCCL_SOCKET_IFNAME=ib0",
        'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "export MASTER_PORT=$(( 20000 + (SLURM_JOB_ID * 4 + ${SLURM_RESTART_COUNT:-0}) % 20000 ))",
        '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=2',
        "--nproc-per-node=8",
        'bash -c \'trap "" USR1; exec "$@"\' torchrun',
        'scancel --signal=USR1 "$SLURM_JOB_ID"',
        'if [ "$stop_requested" = 1 ] || [ "$status" = 75 ]; then',
        '    scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert line in script, f"missing {line!r} in:\n{script}"
    assert f"-m pretrain.cli train {recipe.resolve()}" in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    assert not (tmp_path / "mae_vit_tiny_digits").exists()  # a dry run writes and submits nothing

    assert main([*args, "--launcher", "srun", "--gpus-per-node", "0", "--nproc-per-node", "3"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --ntasks-per-node=3" in script and "--gpus-per-node" not in script
    assert "torch.distributed.run" not in script and "srun --label --kill-on-bad-exit=1" in script


def test_bad_launch_settings_fail_naming_the_key(capsys):
    assert main(["launch", "slurm", str(CONFIG), "--time", "1h", "--dry-run"]) == 2
    assert "launch.time" in capsys.readouterr().err
    assert main(["launch", "slurm", str(CONFIG), "--set", "launch.env.NCCL_IB_DISABLE=1", "--dry-run"]) == 2
    assert "launch.env.NCCL_IB_DISABLE: expected str" in capsys.readouterr().err


def test_status_without_slurm_says_unknown(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "slurm").mkdir(parents=True)
    record = {"job_id": "123", "script": "job.sbatch", "output": "job-123.out"}
    (run_dir / "slurm" / "job.json").write_text(json.dumps(record))
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue, sacct or scontrol
    status = run_status(run_dir)
    assert status["slurm"]["state"] == "unknown" and status["checkpoint"] is None
    text = format_status(status)
    assert "slurm job        123: unknown (SLURM not reachable" in text and "checkpoint       none yet" in text
    assert main(["status", str(run_dir)]) == 0 and capsys.readouterr().out == text + "\n"


def test_two_node_job_requeued_mid_run_matches_an_uninterrupted_run(
    cluster, tmp_path, digit_shards, server, monkeypatch
):
    experiment = f"slurm-requeue-{tmp_path.name}"
    overrides = tiny_overrides(tmp_path / "runs", digit_shards, "engine.kind=ddp", f"train.steps={STEPS}")
    job_overrides = [*overrides, "run.name=job", f'tracking.uri="{server}"', f'tracking.experiment="{experiment}"']
    submitted = _pretrain(
        "launch",
        "slurm",
        str(CONFIG),
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--nproc-per-node",
        "1",
        *_sets(job_overrides),
        env=cluster.env,
    )
    job_id = submitted.stdout.split("submitted job ")[1].split(";")[0]
    job_dir = tmp_path / "runs" / "job"
    output = job_dir / "slurm" / f"job-{job_id}.out"

    def details() -> str:
        text = output.read_text() if output.is_file() else "(no job output yet)"
        return f"job output:\n{text[-6000:]}\n{cluster.run('scontrol', 'show', 'job', job_id, check=False).stdout}"

    # The reference (2 processes, same global batch) runs while the job starts.
    reference = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "pretrain.cli",
            "train",
            str(CONFIG),
            *_sets([*overrides, "run.name=reference", "tracking.enabled=false"]),
        ],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait(lambda: len(_records(job_dir)) >= 3, 180, "the job's third step", details)
        # What `#SBATCH --signal=B:USR1@120` does before the time limit: USR1 to the batch shell only.
        cluster.run("scancel", "--batch", "--signal=USR1", job_id)
        _wait(lambda: cluster.job_state(job_id) == "COMPLETED", 240, "the requeued job to complete", details)
        ref_out, _ = reference.communicate(timeout=300)
        assert reference.returncode == 0, ref_out[-5000:]
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()

    log = output.read_text()
    assert "[launch] USR1: checkpointing and stopping" in log
    assert "[launch] requeueing job" in log and "restart 1," in log, details()
    assert "Restarts=1" in cluster.run("scontrol", "show", "job", job_id).stdout
    stopped_at = [
        int(line.split("step ")[1].split(":")[0]) for line in log.splitlines() if "stopping on SIGUSR1" in line
    ]
    assert stopped_at and 3 <= stopped_at[0] < STEPS, log[-4000:]

    records, expected = _records(job_dir), _records(tmp_path / "runs" / "reference")
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))  # resume appended, nothing repeated
    assert [r["loss"] for r in records] == [r["loss"] for r in expected]

    final = f"checkpoints/step_{STEPS:08d}"
    assert_equal_states(
        _tensors(job_dir / final, tmp_path / "job.pt"),
        _tensors(tmp_path / "runs" / "reference" / final, tmp_path / "reference.pt"),
        "final checkpoint",
    )
    meta = json.loads((job_dir / final / "meta.json").read_text())
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    # One run: found again after the requeue by its id in the checkpoint, or (when the tracker had not
    # created the run yet at that checkpoint) by the job key the checkpoint carries.
    assert len(runs) == 1 and meta["mlflow_run_id"] in (None, runs[0].info.run_id)
    run = runs[0]
    assert run.data.tags[JOB_KEY_TAG] == meta["job_key"] and run.data.tags["slurm_job_id"] == job_id
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], pytest.approx(r["loss"])) for r in records]

    monkeypatch.setenv("SLURM_CONF", cluster.env["SLURM_CONF"])
    status = run_status(job_dir)
    assert status["checkpoint_step"] == STEPS and status["mlflow_run_id"] == run.info.run_id
    assert status["mlflow_ui"] == f"{server}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
    assert status["slurm"]["job_id"] == job_id and status["slurm"]["state"] == "COMPLETED"
