"""Multi-process engines on CPU (gloo): DDP and FSDP2 match one process, and FSDP checkpoints
resume at other world sizes with exactly the saved parameters and optimizer state."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.checkpoint.state_dict import get_state_dict

from pretrain.config import ConfigError
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import assert_equal_states
from tiny import tiny_overrides as tiny_run

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture
def shards(digit_shards: Path) -> Path:
    return digit_shards


def tiny_overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    return tiny_run(out, shards, "tracking.enabled=false", *extra)


def torchrun(
    nproc: int, args: list[str], timeout: float = 600, check: bool = True, **env
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if check:
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"
    return out


def train_args(
    overrides: list[str], *extra: str, config: Path = REPO / "configs/mae_vit_tiny_digits.toml"
) -> list[str]:
    """`pretrain train CONFIG --set ...` for torchrun; an empty `config` makes the run the overrides alone, the
    same config as `load_config(None, overrides)` in the test's own process."""
    sets = [item for override in overrides for item in ("--set", override)]
    return ["-m", "pretrain.cli", "train", str(config), *sets, *extra]


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("engine", "optim"),
    [(["engine.kind=ddp"], []), (["engine.kind=fsdp"], []), (["engine.kind=fsdp"], ["optim.name=lars"])],
    ids=["ddp", "fsdp", "fsdp-lars"],
)
def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path, shards, engine, optim):
    """2 ranks x batch 8 == 1 process x 2 micro-batches of 8: same samples, masks and updates (LARS: its
    layer norms over FSDP's sharded parameters are those of the whole layer)."""
    base = tiny_overrides(tmp_path / "one", shards, "data.num_workers=2", "optim.accum_steps=2", *optim)
    one = Trainer(load_config(REPO / "configs/mae_vit_tiny_digits.toml", base)).fit()
    torchrun(2, train_args(tiny_overrides(tmp_path / "two", shards, *engine, *optim)))
    two = losses(tmp_path / "two" / "tiny")
    assert len(two) == 6
    assert two == pytest.approx(one.losses, rel=1e-5, abs=1e-6)


def resume_dump_and_train(nproc: int, overrides: list[str], dump: Path) -> dict:
    """Under torchrun: build the Trainer (it resumes), dump its full state as loaded, train on."""
    sets = [item for override in overrides for item in ("--set", override)]
    worker = [str(REPO / "tests/dist_worker.py"), str(REPO / "configs/mae_vit_tiny_digits.toml"), str(dump)]
    torchrun(nproc, [*worker, "--fit", *sets])
    return torch.load(dump, weights_only=False)


def full_state_from_checkpoint(checkpoint: Path, overrides: list[str], world_size: int = 1) -> dict:
    """What a checkpoint holds, loaded by one plain process: the reference for resharded loads. Its batch is
    that of `world_size` ranks of 8: a resume rebuilds the schedule for its global batch (linear scaling)."""
    batch = f"data.batch_size={8 * world_size}"
    trainer = Trainer(
        load_config(REPO / "configs/mae_vit_tiny_digits.toml", [*overrides, batch, f'train.resume="{checkpoint}"'])
    )
    model_state, optim_state = get_state_dict(trainer.model, trainer.optimizer)
    return {"model": model_state, "optim": optim_state}


# AdamW's two moments; LARS keeps one momentum buffer per parameter, resumed bit-identically in test_optim.py and
# trained under FSDP at 2 ranks in test_two_ranks_match_one_process_with_the_same_global_batch[fsdp-lars].
@pytest.mark.parametrize("optim", [[]], ids=["adamw"])
def test_fsdp_checkpoint_resumes_at_one_and_three_ranks(tmp_path, shards, optim):
    overrides = tiny_overrides(tmp_path, shards, "engine.kind=fsdp", *optim)
    torchrun(2, train_args(overrides, "--until", "3"))
    checkpoint = tmp_path / "tiny" / "checkpoints" / "step_00000003"
    assert json.loads((checkpoint / "meta.json").read_text())["world_size"] == 2
    for nproc in (1, 3):
        reference = full_state_from_checkpoint(
            checkpoint, tiny_overrides(tmp_path / f"ref{nproc}", shards, *optim), nproc
        )
        first_state = next(iter(reference["optim"]["state"].values()))
        assert ("momentum_buffer" in first_state) == bool(optim) and ("exp_avg" in first_state) != bool(optim)
        dump = tmp_path / f"state_{nproc}.pt"
        resumed = [*overrides, f'run.name="resume{nproc}"', f'train.resume="{checkpoint}"']
        state = resume_dump_and_train(nproc, resumed, dump)
        assert state["step"] == 3
        assert_equal_states({"model": state["model"], "optim": state["optim"]}, reference, f"world {nproc}")
        continued = losses(tmp_path / f"resume{nproc}")
        assert len(continued) == 3 and all(torch.isfinite(torch.tensor(continued)))


def test_meta_init_never_materializes_the_whole_model(tmp_path):
    """MAE ViT-L (1.26 GiB fp32) under a per-process cap of 0.75 x its size: built whole it cannot
    exist; built on the meta device and sharded over 2 ranks, each holds half and runs a forward."""
    script = str(REPO / "tests/dist_meta_init.py")
    sharded = torchrun(2, [script, "meta", "0.75"], MALLOC_MMAP_THRESHOLD_="1048576")
    assert sharded.stdout.count("local params 628 MiB") == 2, sharded.stdout
    whole = torchrun(2, [script, "full", "0.75"], check=False, MALLOC_MMAP_THRESHOLD_="1048576")
    assert whole.returncode != 0 and "can't allocate memory" in whole.stderr


def test_activation_checkpointing_changes_memory_not_results(tmp_path, shards):
    plain = Trainer(load_config(None, tiny_overrides(tmp_path / "plain", shards, "train.steps=3"))).fit()
    ac = tiny_overrides(tmp_path / "ac", shards, "train.steps=3", "engine.activation_checkpointing=true")
    trainer = Trainer(load_config(None, ac))
    assert all(isinstance(block, CheckpointWrapper) for block in trainer.method.inference_network().blocks)
    assert trainer.fit().losses == plain.losses


def test_compiled_blocks_match_eager(tmp_path, shards):
    eager = Trainer(load_config(None, tiny_overrides(tmp_path / "eager", shards, "train.steps=3"))).fit()
    trainer = Trainer(
        load_config(None, tiny_overrides(tmp_path / "compiled", shards, "train.steps=3", "engine.compile=true"))
    )
    assert all(
        isinstance(block, torch._dynamo.eval_frame.OptimizedModule)
        for block in trainer.method.inference_network().blocks
    )
    assert trainer.fit().losses == pytest.approx(eager.losses, rel=1e-5)


def test_fsdp_async_checkpoints_equal_synchronous_ones(tmp_path, shards):
    for mode in ("sync", "async"):
        overrides = tiny_overrides(
            tmp_path / mode,
            shards,
            "engine.kind=fsdp",
            "train.ckpt_every=2",
            f"train.async_checkpoint={str(mode == 'async').lower()}",
        )
        torchrun(2, train_args(overrides, "--until", "4"))
    reference_overrides = tiny_overrides(tmp_path / "ref", shards)
    for step in (2, 4):
        name = f"step_{step:08d}"
        written = full_state_from_checkpoint(tmp_path / "async" / "tiny" / "checkpoints" / name, reference_overrides)
        expected = full_state_from_checkpoint(tmp_path / "sync" / "tiny" / "checkpoints" / name, reference_overrides)
        assert_equal_states(written, expected, name)


@pytest.mark.parametrize(
    "engine",
    [
        ["engine.kind=ddp"],
        ["engine.kind=fsdp", "engine.fsdp.reshard_after_forward=false"],
        ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"],
    ],
    ids=["ddp", "fsdp-no-reshard", "zero3"],
)
def test_three_ranks_train_and_report_per_rank_metrics(tmp_path, shards, engine):
    if "engine.kind=deepspeed" in engine:
        pytest.importorskip("deepspeed")
    torchrun(3, train_args(tiny_overrides(tmp_path, shards, *engine, "train.steps=3")))
    records = [json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert all(record[f"peak_memory_gb_rank{rank}"] > 0 for rank in range(3))
        assert record["peak_memory_gb_max_rank"] == max(record[f"peak_memory_gb_rank{rank}"] for rank in range(3))
        assert record["step_time_slowest_rank"] > 0 and record["step_time_spread"] >= 0
        assert torch.isfinite(torch.tensor(record["loss"]))


def test_deepspeed_checkpoint_converted_to_dcp_resumes_with_fsdp(tmp_path, shards):
    pytest.importorskip("deepspeed")
    overrides = tiny_overrides(tmp_path, shards, "engine.kind=deepspeed", "engine.deepspeed.zero_stage=2")
    torchrun(2, train_args(overrides, "--until", "3"))
    deepspeed_checkpoint = tmp_path / "tiny" / "checkpoints" / "step_00000003"
    converted = tmp_path / "converted"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pretrain.cli",
            "ckpt",
            "convert",
            str(deepspeed_checkpoint),
            "--to",
            "dcp",
            "--out",
            str(converted),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    meta = json.loads((converted / "meta.json").read_text())
    assert (meta["format"], meta["step"], meta["world_size"]) == ("dcp", 3, 2)
    reference = full_state_from_checkpoint(converted, tiny_overrides(tmp_path / "ref", shards), world_size=2)

    dump = tmp_path / "fsdp_state.pt"
    resumed = [*tiny_overrides(tmp_path, shards, "engine.kind=fsdp"), 'run.name="fsdp"', f'train.resume="{converted}"']
    state = resume_dump_and_train(2, resumed, dump)
    assert state["step"] == 3
    assert_equal_states({"model": state["model"], "optim": state["optim"]}, reference, "fsdp after conversion")
    continued = losses(tmp_path / "fsdp")
    assert len(continued) == 3 and all(torch.isfinite(torch.tensor(continued)))


def test_cpu_offload_on_a_cpu_run_fails_before_any_work(tmp_path, shards):
    cfg = load_config(None, tiny_overrides(tmp_path, shards, "engine.kind=fsdp", "engine.fsdp.cpu_offload=true"))
    with pytest.raises(ConfigError, match="engine.fsdp.cpu_offload: .* already computes on the CPU"):
        Trainer(cfg)
    assert not any(tmp_path.iterdir())
