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

Its checkpoint files, and their conversion when the world size, stage or precision changes, are in
deepspeed_checkpoint.py.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import Config, ConfigError
from pretrain.engines.base import Engine, OptimizerFactory
from pretrain.engines.deepspeed_checkpoint import load_checkpoint, save_native
from pretrain.engines.parallelize import prepare_blocks
from pretrain.runtime.world import WorldInfo

log = logging.getLogger("pretrain.engines.deepspeed")


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
        "zero_optimization": {"stage": cfg.engine.deepspeed.zero_stage, **bucket_sizes(num_params)},
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


@dataclass
class DeepSpeedOptions:
    """engine.deepspeed"""

    # ZeRO partitions optimizer state (1), + gradients (2), + parameters (3) across data-parallel ranks.
    zero_stage: Literal[1, 2, 3] = 2


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    checkpoint_format = "deepspeed"
    options = DeepSpeedOptions

    @classmethod
    def validate_config(cls, cfg: Config) -> None:
        if cfg.train.async_checkpoint:
            raise ConfigError("train.async_checkpoint: DeepSpeed writes its own checkpoints synchronously; use false")
        if cfg.optim.name != "adamw":
            # ZeRO steps the optimizer over flat partitions that cut through layers (no whole-layer norms for
            # LARS), and its checkpoint repair and conversion (deepspeed_checkpoint.py) carry Adam's moments.
            raise ConfigError(
                f"optim.name: engine.kind=deepspeed runs AdamW only (its flat partitions and checkpoints hold "
                f"Adam's state), got {cfg.optim.name!r}; use engine.kind=fsdp or ddp"
            )

    def __init__(self, cfg: Config, world: WorldInfo):
        super().__init__(cfg, world)
        self.stage = cfg.engine.deepspeed.zero_stage
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
