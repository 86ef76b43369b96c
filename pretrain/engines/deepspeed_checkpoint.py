"""Checkpoints of engine.kind = "deepspeed": DeepSpeed's native files inside the step directory.

When the world size, ZeRO stage or precision differs from the saver's, the checkpoint is converted to DeepSpeed's universal format in a
temporary directory (the source is only read) and loaded from there. Three things DeepSpeed 0.19 does
not do are done here: universal checkpoints are made loadable across ZeRO-1/2 <-> 3, persistent buffers
are restored from them, and ZeRO-3's universal load keeps each parameter group's settings and step.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.runtime.world import WorldInfo

log = logging.getLogger("pretrain.engines.deepspeed_checkpoint")

UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}

# Modules the engines may wrap blocks in (activation checkpointing, compile); DCP's names omit them, and
# so do the names this module reports and matches checkpoints by.
WRAPPER_NAMES = {"_checkpoint_wrapped_module", "_orig_mod"}


def plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def saved_layout(directory: Path) -> dict[str, Any]:
    """World size, ZeRO stage and precision of a native DeepSpeed checkpoint, from its file names and
    its model-state file (memory-mapped: tensors are not read); {"universal": True} for a universal one."""
    directory = Path(directory)
    optim_files = glob.glob(str(directory / "*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    if not optim_files:
        if (directory / "zero" / "optimizer_state.pt").is_file():
            return {"universal": True}
        raise FileNotFoundError(f"{directory} is not a DeepSpeed ZeRO checkpoint (no *_optim_states.pt, no zero/)")
    model_file = sorted(glob.glob(str(directory / "*mp_rank_*_model_states.pt")))[0]
    config = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True).get("ds_config", {})
    return {
        "world_size": len(optim_files),
        "zero_stage": int(config.get("zero_optimization", {}).get("stage", 0)),
        "bf16": bool(config.get("bf16", {}).get("enabled", False)),
    }


def to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal, in-process and serial: `target` gets zero/<param>/{fp32,exp_avg,
    exp_avg_sq}.pt. It also writes a `latest_universal` file into target's parent."""
    from deepspeed.checkpoint import ds_to_universal

    args = ds_to_universal.argparse.Namespace(
        input_folder=str(source),
        output_folder=str(target),
        num_extract_workers=1,  # >1 forks worker processes, which a process holding a process group should not do
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,
    )
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        ds_to_universal.main(args)
    normalize_universal(target)


MODEL_STATE_NAMES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def normalize_universal(directory: Path) -> None:
    """Make a universal checkpoint loadable by every ZeRO stage, whichever stage wrote it.

    ds_to_universal writes what the saving stage's loader reads, and the loaders differ: ZeRO-1/2 reads
    {"param": tensor} files, a step.pt per parameter, a flat optimizer_state.pt with "ds_version" and
    "param_groups", and the model-state file mp_rank_00_...; ZeRO-3 accepts flat tensors, reads the
    step from optimizer_state.pt's nested "optimizer_state_dict", and wants zero_pp_rank_0_mp_rank_00_...
    (only metadata is read from that file). Write the union."""
    import deepspeed

    present = [directory / name for name in MODEL_STATE_NAMES if (directory / name).is_file()]
    if not present:
        raise FileNotFoundError(f"{directory} has no DeepSpeed model-state file")
    for name in MODEL_STATE_NAMES:
        if not (directory / name).exists():
            shutil.copyfile(present[0], directory / name)

    zero = directory / "zero"
    optim_file = zero / "optimizer_state.pt"
    optim = torch.load(optim_file, map_location="cpu", weights_only=False)
    nested = optim.get("optimizer_state_dict") or {}
    groups = optim.get("param_groups") or nested.get("param_groups")
    step = None
    if nested.get("state"):
        step = next(iter(nested["state"].values())).get("step")
    shapes: dict[str, torch.Size] = {}
    for group in torch.load(present[0], map_location="cpu", weights_only=False, mmap=True)["param_shapes"]:
        shapes.update(group)
    for name, shape in shapes.items():
        folder = zero / name
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            file = folder / f"{key}.pt"
            if not file.is_file():
                continue
            value = torch.load(file, map_location="cpu", weights_only=False)
            if torch.is_tensor(value):
                torch.save({"param": value.reshape(shape), "cat_dim": 0}, file)
        if step is None and (folder / "step.pt").is_file():
            step = torch.load(folder / "step.pt", map_location="cpu", weights_only=False)
    if step is None:
        raise RuntimeError(f"{directory}: the universal checkpoint records no optimizer step")
    for name in shapes:
        if (zero / name / "fp32.pt").is_file() and not (zero / name / "step.pt").is_file():
            torch.save(torch.as_tensor(step).clone(), zero / name / "step.pt")
    optim.setdefault("ds_version", deepspeed.__version__)
    optim["param_groups"] = groups
    optim["optimizer_state_dict"] = {
        **nested,
        "state": {0: {"step": torch.as_tensor(step).clone()}},
        "param_groups": groups,
    }
    torch.save(optim, optim_file)


RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def save_native(engine, directory: Path) -> None:
    """DeepSpeed's checkpoint files into `directory` (every rank calls this). DeepSpeed puts its
    recovery scripts (zero_to_fp32.py: full weights from the shards) next to the checkpoint, in the
    parent; they are moved inside, so the checkpoints root stays ours."""
    parent = directory.parent
    had_scripts = {name: (parent / name).exists() for name in RECOVERY_SCRIPTS}
    engine.save_checkpoint(str(parent), tag=directory.name, client_state=UNIVERSAL_INFO, save_latest=False)
    if engine.global_rank == 0:
        for name, existed in had_scripts.items():
            if not existed and (parent / name).is_file():
                os.replace(parent / name, directory / name)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(engine, directory: Path, world: WorldInfo) -> None:
    """Restore weights and optimizer state into a DeepSpeed engine: directly when the checkpoint's
    world size, ZeRO stage and precision match the engine's, else through a universal conversion."""
    saved = saved_layout(directory)
    current = {
        "world_size": engine.dp_world_size,
        "zero_stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(),
    }
    if saved == current:
        _load(engine, directory, universal=False)
        return
    log.info("checkpoint %s (%s) is loaded as a universal checkpoint by this run (%s)", directory, saved, current)
    names = [name for name, _ in engine.module.named_parameters()]
    with universal_copy(directory, world, names) as converted:
        _load(engine, converted, universal=True)


def _load(engine, directory: Path, universal: bool) -> None:
    config = engine._config  # DeepSpeed reads the universal switch from its config at load time
    config.load_universal_checkpoint = universal
    try:
        path, _ = engine.load_checkpoint(
            str(directory.parent),
            tag=directory.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
            load_module_strict=True,
        )
    finally:
        config.load_universal_checkpoint = False
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {directory}")
    if universal:
        restore_buffers(engine.module, directory)
        if engine.zero_optimization_stage() == 3:
            _repair_zero3_universal_load(engine, directory)


def persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    found = {}
    for prefix, sub in module.named_modules():
        for name, buffer in sub._buffers.items():
            if buffer is not None and name not in sub._non_persistent_buffers_set:
                found[f"{prefix}.{name}" if prefix else name] = buffer
    return found


def restore_buffers(module: nn.Module, directory: Path) -> None:
    """A universal load restores parameters and optimizer state only; persistent buffers (running
    statistics, a DINO center) come from the model-state file, which stores them whole at every stage."""
    buffers = persistent_buffers(module)
    if not buffers:
        return
    model_file = next(directory / name for name in MODEL_STATE_NAMES if (directory / name).is_file())
    module_state = torch.load(model_file, map_location="cpu", weights_only=False, mmap=True)["module"]
    saved = {plain_name(name): value for name, value in module_state.items()}
    buffers = {plain_name(name): buffer for name, buffer in buffers.items()}
    missing = sorted(set(buffers) - set(saved))
    if missing:
        raise RuntimeError(f"{directory}: no saved value for the buffers {missing}")
    with torch.no_grad():
        for name, buffer in buffers.items():
            buffer.copy_(saved[name])


def _repair_zero3_universal_load(engine, directory: Path) -> None:
    """Two slips of DeepSpeed 0.19's ZeRO-3 universal load, undone: it gives every parameter group the
    settings of group 0 (so parameters without weight decay would get it), and it gives every flat
    partition the *same* step tensor, which torch's Adam then increments once per partition."""
    saved = torch.load(directory / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved.get("param_groups") or saved["optimizer_state_dict"]["param_groups"]
    optimizer = engine.optimizer.optimizer
    if len(groups) != len(optimizer.param_groups):
        raise RuntimeError(
            f"{directory}: {len(groups)} optimizer parameter groups saved, {len(optimizer.param_groups)} now"
        )
    for group, saved_group in zip(optimizer.param_groups, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def optimizer_step_count(engine) -> torch.Tensor | None:
    """Adam's step count; ZeRO steps every flat partition together, so one count serves all parameters."""
    for state in engine.optimizer.optimizer.state.values():
        if "step" in state:
            return torch.as_tensor(state["step"]).detach().cpu().clone().float()
    return None


def consolidated_state(engine) -> dict[str, dict[str, Any]]:
    """Full fp32 master weights, Adam state and persistent buffers by (plain) name, on CPU.

    A collective: every rank must call it (ZeRO-3 gathers each parameter); every rank gets the result."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    step = optimizer_step_count(engine)
    if step is not None and engine.zero_optimization_stage() < 3:
        # ZeRO-1/2 links each parameter to its slice of Adam's state right after the first parameter
        # group's first step, before the other groups have state, so only group 0 would be readable.
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    params: dict[str, torch.Tensor] = {}
    optim: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in engine.module.named_parameters():
        if not param.requires_grad:
            continue
        name = plain_name(name)
        params[name] = safe_get_full_fp32_param(param).detach().float().cpu().clone()
        if step is None:
            continue
        optim[name] = {"step": step.clone()}
        for key in ("exp_avg", "exp_avg_sq"):
            optim[name][key] = safe_get_full_optimizer_state(param, key).detach().float().cpu().clone()
    buffers = {plain_name(n): b.detach().cpu().clone() for n, b in persistent_buffers(engine.module).items()}
    return {"model": params, "optim": optim, "buffers": buffers}


@contextlib.contextmanager
def universal_copy(directory: Path, world: WorldInfo, param_names: list[str]) -> Iterator[Path]:
    """A universal checkpoint made from `directory` (converted, or copied if it is one already) for a
    model whose parameters are `param_names`, by one rank per node in that node's temporary directory
    (no shared writable storage needed; the source is only read)."""
    token = [uuid.uuid4().hex if world.rank == 0 else None]
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(token, src=0)
    root = Path(tempfile.gettempdir()) / f"pretrain-ds-universal-{token[0]}"
    target = root / directory.name
    converter = world.local_rank == 0
    try:
        error = None
        if converter:
            try:
                root.mkdir(parents=True, exist_ok=True)
                if saved_layout(directory).get("universal"):
                    shutil.copytree(directory, target)
                    normalize_universal(target)
                else:
                    to_universal(directory, target)
                alias_parameters(target, param_names)
            except Exception as caught:  # every rank must learn of it, not wait for the converter forever
                error = caught
        if _any_rank(error is not None):
            raise RuntimeError(f"converting {directory} to a universal checkpoint failed") from error
        yield target
        if dist.is_initialized():
            dist.barrier()
    finally:
        if converter:
            shutil.rmtree(root, ignore_errors=True)


def alias_parameters(directory: Path, param_names: list[str]) -> None:
    """Universal checkpoints store a folder per parameter *as the saving module named it*: wrapping
    blocks for activation checkpointing or compile renames them. Link each name this model uses to the
    saved folder of the same plain name."""
    zero = directory / "zero"
    saved = {plain_name(folder.name): folder for folder in zero.iterdir() if folder.is_dir()}
    for name in param_names:
        if not (zero / name).exists() and plain_name(name) in saved:
            os.symlink(saved[plain_name(name)].resolve(), zero / name, target_is_directory=True)


def _any_rank(flag: bool) -> bool:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
