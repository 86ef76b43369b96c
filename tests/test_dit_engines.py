"""DiT under a 2-process engine (FSDP2 on CPU with gloo): the EMA twin is sharded like the online model, sample
grids are drawn from the sharded EMA, and 2 ranks reproduce 1 process with 2 accumulation micro-batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dit_training import dit_overrides

from pretrain.ckpt.export import export_weights
from pretrain.recipes import load_config
from pretrain.train import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/dit_digits.toml"


@pytest.mark.parametrize("engine", ["ddp", "fsdp", "deepspeed"])
def test_dit_two_ranks_match_one_process(tmp_path, digit_shards, engine):
    steps = ["train.steps=3", "optim.warmup_steps=1"]
    # 2 ranks x 1 stream == 1 process with 2 data workers (2 streams) and 2 micro-batches per step.
    single = dit_overrides(tmp_path / "one", digit_shards, "optim.accum_steps=2", "data.num_workers=2", *steps)
    one_trainer = Trainer(load_config(CONFIG, single))
    one = one_trainer.fit()

    sets = [
        x
        for o in dit_overrides(tmp_path / "two", digit_shards, f"engine.kind={engine}", "train.vis_every=3", *steps)
        for x in ("--set", o)
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "pretrain.cli", "train", str(CONFIG), *sets]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert out.returncode == 0, out.stderr[-4000:]
    lines = (tmp_path / "two" / "tiny_dit" / "metrics.jsonl").read_text().splitlines()
    two = [json.loads(line)["loss"] for line in lines]
    assert two == pytest.approx(one.losses, rel=1e-5, abs=1e-6)

    # The EMA the engine kept across ranks (exported from its checkpoint) is the one-process EMA.
    exported = export_weights(tmp_path / "two" / "tiny_dit", tmp_path / "ema.safetensors", part="encoder")
    ema = load_file(exported["file"])
    reference = one_trainer.method.ema.state_dict()
    assert ema.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.allclose(ema[name], tensor, rtol=1e-4, atol=1e-6), name
