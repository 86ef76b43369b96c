"""Convert between DeepSpeed ZeRO checkpoints and the DCP layout of the single/DDP/FSDP engines.

Both directions go through DeepSpeed's *universal* checkpoint: one folder per parameter holding its
full fp32 value and Adam moments (zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt), independent of the
world size and ZeRO stage that wrote it.

- `deepspeed_to_dcp`: a native ZeRO checkpoint (any stage, any world size) or a universal one becomes
  a one-process DCP checkpoint, `{"model": ..., "optim": ...}` exactly as `get_state_dict` gives them
  for a plain module and torch AdamW (fully-qualified names).
- `dcp_to_deepspeed`: a DCP checkpoint becomes a universal DeepSpeed checkpoint, which
  `DeepSpeedEngine.load_tensors` loads at any world size and ZeRO stage.

Neither writes meta.json or the per-rank files (RNG, data position, schedule) of our checkpoint
layout: those are the caller's to copy.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from pretrain.checkpoint import dcp_load, dcp_save
from pretrain.engines.deepspeed import ensure_process_group, import_deepspeed
from pretrain.engines.deepspeed_checkpoint import (
    MODEL_STATE_NAMES,
    normalize_universal,
    plain_name,
    save_native,
    saved_layout,
    to_universal,
)

log = logging.getLogger("pretrain.engines.deepspeed_convert")

MethodBuilder = Callable[[], nn.Module]
OptimizerBuilder = Callable[[nn.Module], torch.optim.Optimizer]
ADAM_STATES = ("exp_avg", "exp_avg_sq")


def _default_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters())


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The names of each optimizer group's parameters."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]


# ---------------------------------------------------------------------- DeepSpeed -> DCP


def read_universal(directory: Path) -> dict[str, Any]:
    """Everything in a (normalized) universal checkpoint, by plain parameter name: fp32 values, Adam
    state, persistent buffers and the optimizer's parameter-group settings."""
    zero = directory / "zero"
    optim = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
    model_file = next(directory / n for n in MODEL_STATE_NAMES if (directory / n).is_file())
    model_state = torch.load(model_file, map_location="cpu", weights_only=False)
    shapes: dict[str, torch.Size] = {}
    for group in model_state["param_shapes"]:
        shapes.update(group)
    params, state = {}, {}
    for name in shapes:
        folder = zero / name
        params[plain_name(name)] = torch.load(folder / "fp32.pt", map_location="cpu", weights_only=False)["param"]
        if (folder / "exp_avg.pt").is_file():
            entry = {
                k: torch.load(folder / f"{k}.pt", map_location="cpu", weights_only=False)["param"] for k in ADAM_STATES
            }
            step = torch.load(folder / "step.pt", map_location="cpu", weights_only=False)
            entry["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
            state[plain_name(name)] = entry
    buffer_names = set(model_state.get("buffer_names") or [])
    buffer_names = {plain_name(name) for name in buffer_names}
    module_state = {plain_name(k): v for k, v in model_state["module"].items()}
    buffers = {k: v for k, v in module_state.items() if k in buffer_names}
    return {"params": params, "state": state, "buffers": buffers, "param_groups": optim["param_groups"]}


def deepspeed_to_dcp(
    ds_checkpoint_dir: str | Path,
    out_dir: str | Path,
    method_builder: MethodBuilder,
    make_optimizer: OptimizerBuilder | None = None,
) -> None:
    """Consolidate a DeepSpeed ZeRO checkpoint into a one-process DCP checkpoint at `out_dir`.

    `method_builder()` builds the (plain, unwrapped) module the checkpoint was trained as, and
    `make_optimizer(module)` its torch AdamW with the same parameter groups (default: one group);
    each group's settings (lr, betas, eps, weight decay) come from the checkpoint."""
    source, out_dir = Path(ds_checkpoint_dir), Path(out_dir)
    make_optimizer = make_optimizer or _default_optimizer
    with tempfile.TemporaryDirectory(prefix="pretrain-ds-to-dcp-") as scratch:
        universal = Path(scratch) / "universal"
        if saved_layout(source).get("universal"):
            shutil.copytree(source, universal)
            normalize_universal(universal)
        else:
            import_deepspeed(torch.device("cpu"))
            to_universal(source, universal)
        saved = read_universal(universal)

    model = method_builder()
    optimizer = make_optimizer(model)
    group_names = _param_names(model, optimizer)
    expected = {n for n, p in model.named_parameters()}
    if set(saved["params"]) != expected:
        raise ValueError(
            f"{source} does not match the model: missing {sorted(expected - set(saved['params']))}, "
            f"unexpected {sorted(set(saved['params']) - expected)}"
        )
    if len(saved["param_groups"]) != len(group_names):
        raise ValueError(
            f"{source} has {len(saved['param_groups'])} optimizer parameter groups, the optimizer {len(group_names)}"
        )
    model_state = {**model.state_dict(), **saved["params"], **saved["buffers"]}
    optim_state = {
        "state": saved["state"],
        "param_groups": [
            {**{k: v for k, v in group.items() if k != "params"}, "params": names}
            for group, names in zip(saved["param_groups"], group_names)
        ],
    }
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    model_state, optim_state = get_state_dict(model, optimizer)
    out_dir.mkdir(parents=True, exist_ok=True)
    dcp_save({"model": model_state, "optim": optim_state}, out_dir)


# ---------------------------------------------------------------------- DCP -> DeepSpeed


def dcp_to_deepspeed(
    dcp_dir: str | Path,
    out_dir: str | Path,
    method_builder: MethodBuilder,
    make_optimizer: OptimizerBuilder | None = None,
) -> None:
    """Write the model and AdamW state of a DCP checkpoint (from any of our DCP engines) as a universal
    DeepSpeed checkpoint at `out_dir`, loadable by `DeepSpeedEngine.load_tensors` at any world size
    and ZeRO stage (and by DeepSpeed itself with "checkpoint": {"load_universal": true}).

    `method_builder`/`make_optimizer` as for `deepspeed_to_dcp`: the optimizer's parameter groups must
    be those of the run that wrote the DCP checkpoint."""
    out_dir = Path(out_dir)
    make_optimizer = make_optimizer or _default_optimizer
    model = method_builder()
    optimizer = make_optimizer(model)
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp_load(state, Path(dcp_dir))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    model_state, optim_state = get_state_dict(model, optimizer)  # by name, as loaded

    # DeepSpeed's model-state file (metadata: parameter shapes, versions, buffers) from a one-process
    # ZeRO-1 engine over the loaded module and a fresh optimizer; its optimizer files are dropped.
    _write_model_state(model, make_optimizer(model), out_dir)
    for stale in out_dir.glob("*_optim_states.pt"):
        stale.unlink()

    zero = out_dir / "zero"
    steps = set()
    for name, param in model_state.items():
        if name not in dict(model.named_parameters()):
            continue
        folder = zero / name
        folder.mkdir(parents=True, exist_ok=True)
        torch.save({"param": param.detach().float().cpu(), "cat_dim": 0}, folder / "fp32.pt")
        entry = optim_state["state"].get(name)
        if entry is None:
            continue
        for key in ADAM_STATES:
            torch.save({"param": entry[key].detach().float().cpu(), "cat_dim": 0}, folder / f"{key}.pt")
        step = torch.as_tensor(entry["step"], dtype=torch.float32).cpu().clone()
        steps.add(float(step))
        torch.save(step, folder / "step.pt")
    if len(steps) > 1:
        raise ValueError(f"{dcp_dir}: parameters were stepped different numbers of times ({sorted(steps)})")
    import deepspeed

    groups = [
        {k: v for k, v in group.items() if k != "params"} | {"params": []} for group in optim_state["param_groups"]
    ]
    torch.save({"ds_version": deepspeed.__version__, "param_groups": groups}, zero / "optimizer_state.pt")
    normalize_universal(out_dir)


def _write_model_state(model: nn.Module, optimizer: torch.optim.Optimizer, out_dir: Path) -> None:
    deepspeed = import_deepspeed(torch.device("cpu"))
    config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 1},
        "zero_allow_untested_optimizer": True,
    }
    # DeepSpeed keeps handles on the process group for the life of the process, so a one-process
    # group made here stays (as it does for an engine).
    ensure_process_group(torch.device("cpu"))
    if dist.get_world_size() != 1:
        raise RuntimeError("dcp_to_deepspeed runs in one process")
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_native(engine, out_dir)
    engine.destroy()
