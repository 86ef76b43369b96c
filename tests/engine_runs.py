"""2-rank runs of the BatchNorm methods on every engine, and of a fine-tune, against one process on the whole batch.

All cases run in one torchrun (tests/dist_engine_runs.py), started once per session by the `engine_runs`
fixture: process start-up and imports are the larger part of each case's cost. Each test compares its case
with the one-process run, computed in the test process (and cached: cases that differ only in engine share it).
"""

from __future__ import annotations

import functools
import importlib.util

import pytest
import torch
from dist_engine_runs import run_config, train_steps

from pretrain.runtime.world import WorldInfo

# case -> (run: METHOD,override..., tolerance of the parameters and `loss_rel`). ddp and fsdp run in float64,
# exact up to summation order. ZeRO-3 holds float32 parameters only: it starts from the float64 initialization
# rounded, and AdamW's eps is 1e-3 so that a near-zero gradient whose float32 sign differs moves its weight by
# a fraction of the step, not by +-lr. SimCLR's BatchNorms over 8 noise images (1x1 maps in layer4) then still
# leave a few hundred of its 11M conv weights up to 1.2e-3 apart after 3 steps, its losses 1e-5; MoCo v2's
# shuffled per-rank BatchNorms stay within 3e-6.
ZERO3 = "engine.kind=deepspeed,engine.deepspeed.zero_stage=3,optim.base_lr=1e-3,optim.eps=1e-3"
CASES = {
    "simclr-ddp-lars": ("simclr,engine.kind=ddp,optim.name=lars,optim.base_lr=0.5", None),
    "simclr-fsdp-sgd": ("simclr,engine.kind=fsdp,optim.name=sgd,optim.base_lr=0.05,optim.nesterov=true", None),
    "simclr-zero3-adamw": (f"simclr,{ZERO3}", {"rtol": 1e-4, "atol": 2e-3, "loss_rel": 1e-4}),
    "moco_v2-ddp-sgd": ("moco_v2,engine.kind=ddp,optim.name=sgd,optim.base_lr=0.05", None),
    "moco_v2-fsdp-sgd": ("moco_v2,engine.kind=fsdp,optim.name=sgd,optim.base_lr=0.05", None),
    "moco_v2-zero3-adamw": (f"moco_v2,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
    "finetune-ddp-adamw": ("finetune,engine.kind=ddp,optim.base_lr=1e-3", None),
    "finetune-fsdp-adamw": ("finetune,engine.kind=fsdp,optim.base_lr=1e-3", None),
    # AdamW's eps 1e-3 here too: a float64 gradient of ~0 whose rounding differs between 1 and 2 ranks would
    # otherwise step its weight by +-lr (seen: 1 of 147,456 weights 3e-5 apart after 3 steps).
    "dinov2-ddp-adamw": ("dinov2,engine.kind=ddp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "dinov2-fsdp-adamw": ("dinov2,engine.kind=fsdp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "dinov2-zero3-adamw": (f"dinov2,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
    # A frozen teacher wider than the student, sharded like it, and the student's spare EMA.
    "dinov2_distill-fsdp-adamw": ("dinov2_distill,engine.kind=fsdp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "dinov2_distill-zero3-adamw": (f"dinov2_distill,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
    "pixelcnn-ddp-adamw": ("pixelcnn,engine.kind=ddp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "pixelcnn-fsdp-adamw": ("pixelcnn,engine.kind=fsdp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "vq-ddp-adamw": ("vq,engine.kind=ddp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "vq-fsdp-adamw": ("vq,engine.kind=fsdp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "pixelcnn-zero3-adamw": (f"pixelcnn,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
    "vq-zero3-adamw": (f"vq,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
    "gpt-ddp-adamw": ("gpt,engine.kind=ddp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "gpt-fsdp-adamw": ("gpt,engine.kind=fsdp,optim.base_lr=1e-3,optim.eps=1e-3", None),
    "gpt-zero3-adamw": (f"gpt,{ZERO3}", {"rtol": 1e-4, "atol": 2e-4}),
}
EXACT = {"rtol": 1e-4, "atol": 1e-5}


def runnable(run: str) -> bool:
    return "deepspeed" not in run or importlib.util.find_spec("deepspeed") is not None


def one_process(run: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    return _one_process(",".join(part for part in run.split(",") if not part.startswith("engine.")))


@functools.cache
def _one_process(run: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return train_steps(run_config(run, engines=False), WorldInfo(rank=0, local_rank=0, world_size=1))
    finally:
        torch.set_default_dtype(default)


def check_case(results: dict, case: str) -> dict[str, torch.Tensor]:
    """The case's losses and every tensor it saved equal one process's; returns the one-process state."""
    run, tolerance = CASES[case]
    tolerance = dict(tolerance or EXACT)
    loss_rel = tolerance.pop("loss_rel", 1e-5)
    if not runnable(run):
        pytest.skip("deepspeed is not installed")
    losses, state = one_process(run)
    two = results[run]
    assert two["losses"] == pytest.approx(losses, rel=loss_rel)
    assert len(set(losses)) == len(losses)  # it trains
    for name, value in state.items():
        if name not in two["state"]:  # ZeRO-3's consolidated state holds trained parameters and buffers only
            assert "num_batches_tracked" not in name and "running" not in name and "queue" not in name, name
            continue
        torch.testing.assert_close(two["state"][name], value, **tolerance, msg=lambda m, n=name: f"{n}: {m}")
    if run.split(",")[0] in ("simclr", "moco_v2"):  # the ResNets' BatchNorm statistics are compared too
        assert any("running_var" in name for name in two["state"])
    return state
