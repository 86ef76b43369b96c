"""DeepSpeed ZeRO stages 1, 2 and 3: optimizer state (1), gradients (2) and parameters (3) partitioned
across data-parallel ranks, with DeepSpeed's native checkpoints.

How the one train loop maps onto DeepSpeed:

- `setup` hands the method and the torch AdamW built by the loop's factory to `deepspeed.initialize`
  (no DeepSpeed "optimizer" or "scheduler" section) and returns DeepSpeed's engine as the module to
  call and the *torch* optimizer. ZeRO steps that optimizer over its flat fp32 partitions, reading
  `lr` (and each group's weight decay) from its `param_groups`, so the loop's LambdaLR drives the
  learning rate; DeepSpeed has no schedule of its own.
- Accumulation: the loop already divides the loss by `accum_steps`, so `backward` calls DeepSpeed with
  `scale_wrt_gas=False`; `accumulate(model, last_micro_step)` tells DeepSpeed which backward ends the
  window (it reduces gradients there), and `optimizer_step` is one `engine.step()` per window.
- Clipping happens inside `engine.step()` ("gradient_clipping" = optim.grad_clip). `clip_grad_norm`
  returns the norm DeepSpeed clips with: the global L2 norm of the reduced, averaged gradients before
  clipping, from the ZeRO optimizer's own routine over its gradient partitions (one small all-reduce;
  step() computes it again). It equals `engine.get_global_grad_norm()` after the step, but is known
  before it, so the loop can skip a non-finite step; non-finite gradients give inf.
- A skipped step (`zero_grad`) uses DeepSpeed's overflow path: the gradients are marked non-finite and
  `engine.step()` drops them without touching weights or optimizer state.
- bf16 is DeepSpeed's: bf16 weights and gradients, fp32 master weights and Adam state (see ds_config).

Checkpoints are DeepSpeed's files inside the step directory. When the world size, ZeRO stage or
precision differs from the saver's, the checkpoint is converted to DeepSpeed's universal format in a
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

from launch.env import WorldInfo
from pretrain.config import Config
from pretrain.engines.base import Engine, OptimizerFactory
from pretrain.engines.parallelize import prepare_blocks

log = logging.getLogger("pretrain.engines.zero")

UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.4}}
# Modules the engines may wrap blocks in (activation checkpointing, compile); DCP's names omit them, and
# so do the names this module reports and matches checkpoints by.
WRAPPER_NAMES = {"_checkpoint_wrapped_module", "_orig_mod"}


def plain_name(name: str) -> str:
    return ".".join(part for part in name.split(".") if part not in WRAPPER_NAMES)


def import_deepspeed(device: torch.device):
    """Import DeepSpeed with its accelerator matching our device (it otherwise picks CUDA whenever it can)."""
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if device.type == "cuda" else "cpu")
    try:
        import deepspeed
        import deepspeed.ops
    except ImportError as error:
        raise RuntimeError(
            "engine.kind=deepspeed needs DeepSpeed: DS_BUILD_OPS=0 pip install --no-build-isolation 'deepspeed>=0.19,<0.20'"
        ) from error
    from deepspeed.accelerator import get_accelerator

    picked = get_accelerator().device_name()
    if picked != device.type:
        raise RuntimeError(
            f"DeepSpeed chose its '{picked}' accelerator but run.device resolved to '{device.type}'; "
            f"set DS_ACCELERATOR={device.type} before starting"
        )
    if picked == "cpu":
        # DeepSpeed's CPU backend compiles a shared-memory all-reduce (about 50 s of C++ on first use) that
        # only its inference all-reduce uses; training communicates through torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # it logs its whole config at INFO on every start
    return deepspeed


def ensure_process_group(device: torch.device, local_rank: int = 0) -> bool:
    """DeepSpeed always needs a process group and the LOCAL_RANK variable (srun and plain python set
    none): reuse the launcher's group, else make a one-process one. Returns whether it made one."""
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return True


def ds_config(
    cfg: Config, precision: str, world_size: int, device: torch.device, num_params: int = 0
) -> dict[str, Any]:
    """Our configuration in DeepSpeed's terms.

    bf16 is DeepSpeed's: bf16 weights and gradients (reduced in bf16), fp32 master weights and Adam
    state in the optimizer partitions; the loop's autocast still runs on top. DeepSpeed keeps buffers
    in fp32, which CUDA autocast handles; CPU autocast does not cast LayerNorm's inputs, so fp32 position
    buffers would meet bf16 norm weights there: on CPU buffers are bf16 too."""
    micro, accum = cfg.data.batch_size, cfg.optim.accum_steps
    bf16 = precision == "bf16"
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "bf16": {"enabled": bf16, "check_grad_overflow": True},
        "zero_optimization": {"stage": cfg.engine.zero_stage, **bucket_sizes(num_params)},
        # torch AdamW over flat partitions is exactly what ZeRO does with its own Adam; allow it by name.
        "zero_allow_untested_optimizer": True,
        "checkpoint": {"load_universal": False},
        "wall_clock_breakdown": False,
    }
    if bf16 and device.type == "cpu":
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def bucket_sizes(num_params: int) -> dict[str, int]:
    """Communication buckets of at most an eighth of the model (DeepSpeed's default of 5e8 elements is
    larger than most models, so every rank would hold a full-size gradient bucket and ZeRO would save
    nothing over DDP; measured by benchmarks/engine_memory.py)."""
    if num_params <= 0:
        return {}
    size = int(min(5e8, max(2**20, num_params // 8)))
    return {"reduce_bucket_size": size, "allgather_bucket_size": size, "stage3_prefetch_bucket_size": size}


# ---------------------------------------------------------------------- checkpoint layout


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


# ---------------------------------------------------------------------- the engine


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_format = "deepspeed"

    def __init__(self, cfg: Config, world: WorldInfo):
        super().__init__(cfg, world)
        self.stage = cfg.engine.zero_stage
        self.ds = None  # deepspeed's engine, after setup
        self._last_micro_step: bool | None = None
        self._micro_steps = 0

    def config(self, num_params: int = 0) -> dict[str, Any]:
        return ds_config(self.cfg, self.precision, self.world.world_size, self.device, num_params)

    def setup(self, method: nn.Module, make_optimizer: OptimizerFactory) -> tuple[nn.Module, torch.optim.Optimizer]:
        deepspeed = import_deepspeed(self.device)
        ensure_process_group(self.device, self.world.local_rank)
        opts = self.cfg.engine
        if opts.compile and self.stage == 3:
            raise ValueError("engine.compile: ZeRO-3 gathers parameters in module hooks, which compiled blocks bypass")
        prepare_blocks(method, opts.activation_checkpointing, opts.compile)
        method.to(self.device)
        optimizer = make_optimizer(method)
        engine, _, _, _ = deepspeed.initialize(
            model=method,
            optimizer=optimizer,
            config=self.config(sum(p.numel() for p in method.parameters())),
            dist_init_required=False,
        )
        self.ds = engine
        return engine, optimizer

    # ------------------------------------------------------------------ step

    def accumulate(self, model: nn.Module, last_micro_step: bool) -> contextlib.AbstractContextManager:
        self._last_micro_step = last_micro_step
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed reduces gradients in the backward it is told ends the accumulation window. The loop
        # says which one through `accumulate`; without it, count micro-steps.
        self._micro_steps += 1
        last = self._last_micro_step
        if last is None:
            last = self._micro_steps % self.cfg.optim.accum_steps == 0
        self._last_micro_step = None
        self.ds.set_gradient_accumulation_boundary(last)
        self.ds.backward(loss, scale_wrt_gas=False)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Global L2 norm of the averaged gradients before clipping (inf if any is non-finite).

        Clipping itself happens in `optimizer_step` (DeepSpeed's "gradient_clipping", set from the
        same optim.grad_clip), with this very norm."""
        if float(max_norm) != float(self.cfg.optim.grad_clip):
            raise ValueError(f"DeepSpeed clips at optim.grad_clip={self.cfg.optim.grad_clip}, not at {max_norm}")
        return global_grad_norm(self.ds).detach().float().reshape(())

    def optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self._micro_steps = 0
        self.ds.step()
        if not self.ds.was_step_applied():
            log.warning("DeepSpeed skipped the optimizer step (non-finite gradients)")

    def zero_grad(self, optimizer: torch.optim.Optimizer) -> None:
        """Drop this window's gradients without an update, through DeepSpeed's overflow path."""
        self._micro_steps = 0
        poison_gradients(self.ds)
        self.ds.step()
        if self.ds.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step that should have been skipped")

    def full_parameters(self, model: nn.Module, module: nn.Module) -> contextlib.AbstractContextManager:
        if self.stage != 3:
            return contextlib.nullcontext()
        deepspeed = import_deepspeed(self.device)
        return deepspeed.zero.GatheredParameters(list(module.parameters()))

    def local_tensors(self, param: nn.Parameter) -> list[torch.Tensor]:
        # ZeRO-3 keeps each rank's flat partition in `ds_tensor`; `param.data` is empty between forwards,
        # except for small "persistent" parameters, which stay gathered and are read from `param.data`.
        if not hasattr(param, "ds_tensor"):
            return [param.data]
        return [param.ds_tensor, param.data] if getattr(param, "ds_persist", False) else [param.ds_tensor]

    # ------------------------------------------------------------------ checkpoints

    def save_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        save_native(self.ds, Path(directory))

    def load_tensors(self, model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
        load_checkpoint(self.ds, Path(directory), self.world)


# ---------------------------------------------------------------------- helpers on a DeepSpeed engine


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


def global_grad_norm(engine) -> torch.Tensor:
    """The norm ZeRO computes in step(), computed now: per-group norms of the gradient partitions,
    all-reduced over the data-parallel group; inf when any gradient is non-finite."""
    from deepspeed.runtime.utils import combine_grad_norm_groups

    optimizer = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        norm = combine_grad_norm_groups(optimizer._get_norm_groups())
    else:
        norm = optimizer.scaled_global_norm()
    return torch.as_tensor(norm) / optimizer.loss_scale


def poison_gradients(engine) -> None:
    """Make one parameter's gradient NaN so that step() takes DeepSpeed's overflow path (which zeroes
    every gradient buffer and leaves weights and optimizer state alone)."""
    from deepspeed.utils import safe_set_full_grad

    param = next(p for p in engine.module.parameters() if p.requires_grad)
    shape = param.ds_shape if hasattr(param, "ds_shape") else param.shape
    safe_set_full_grad(param, torch.full(shape, float("nan"), device=engine.device))


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
