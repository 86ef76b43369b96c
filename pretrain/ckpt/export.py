"""`pretrain ckpt export`: a checkpoint's weights as one safetensors file.

The method is rebuilt on CPU and its weights loaded through DCP (any world size, any DCP engine) or
merged from DeepSpeed's ZeRO partitions. The file holds the inference network's state dict (keys as in
its own `state_dict()`, so `load_state_dict(strict=True)` takes the file as is) or the whole method's,
with step, method and model shape in the safetensors header.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pretrain.checkpoint import find_checkpoint, read_meta
from pretrain.ckpt.load import load_method
from pretrain.methods.registry import build_method
from pretrain.recipes import config_from_saved

PARTS = ("encoder", "model")
DTYPES = ("float32", "bfloat16", "float16")


def _load_weights(ckpt: Path, meta: dict[str, Any]):
    """(config, method with the checkpoint's weights on CPU)."""
    fmt = meta.get("format", "dcp")
    if fmt == "dcp":
        cfg, method, _ = load_method(ckpt)
        return cfg, method
    if fmt == "deepspeed":
        return _load_deepspeed(ckpt, meta)
    raise ValueError(f"{ckpt}: unknown checkpoint format {fmt!r}")


def _load_deepspeed(ckpt: Path, meta: dict[str, Any]):
    """fp32 weights of a DeepSpeed ZeRO checkpoint (any stage), merged by DeepSpeed's zero_to_fp32."""

    cfg = config_from_saved(meta["config"])
    method = build_method(cfg)
    # DeepSpeed prints accelerator notices and progress bars while importing and merging; errors still raise.
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        except ImportError as error:
            raise RuntimeError(f"{ckpt} is a DeepSpeed checkpoint; exporting it needs DeepSpeed installed") from error
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
    method.load_state_dict(state, strict=True)
    return cfg, method.eval()


def export_weights(
    path: str | Path, out: str | Path, part: str = "encoder", dtype: str = "float32", force: bool = False
) -> dict[str, Any]:
    """Write the encoder's (or the whole method's) weights of a checkpoint to one safetensors file.

    Returns what was written: file, step, part, dtype, tensors, parameters, bytes."""
    if part not in PARTS:
        raise ValueError(f"--part must be one of {', '.join(PARTS)}, not {part!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; --out must name a file")
    ckpt = find_checkpoint(path)
    meta = read_meta(ckpt)
    cfg, method = _load_weights(ckpt, meta)
    module = method.inference_network() if part == "encoder" else method
    target = getattr(torch, dtype)
    tensors = {
        name: (t.detach().to(target) if t.is_floating_point() else t.detach()).contiguous()
        for name, t in module.state_dict().items()
    }
    header = {
        "format": "pt",
        "part": part,
        "dtype": dtype,
        "step": str(meta["step"]),
        "method": cfg.method.name,
        "model_size": cfg.model.size,
        "patch_size": str(cfg.model.patch_size),
        "image_size": str(cfg.data.image_size),
        "in_chans": str(cfg.model.in_chans),
        "module": type(module).__name__,
        "source_checkpoint": str(ckpt.resolve()),
        "engine": str(meta.get("engine")),
        "saved_at": str(meta.get("saved_at")),
        "mlflow_run_id": str(meta.get("mlflow_run_id") or ""),
        "config": json.dumps(cfg.to_dict(), sort_keys=True),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates the file 0600; give it the usual permissions
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "file": str(out),
        "checkpoint": str(ckpt),
        "step": meta["step"],
        "part": part,
        "dtype": dtype,
        "tensors": len(tensors),
        "parameters": sum(t.numel() for t in tensors.values()),
        "bytes": out.stat().st_size,
    }
