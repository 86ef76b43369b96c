"""`pretrain ckpt`: inspect a checkpoint and export its weights as one safetensors file.

    pretrain ckpt inspect PATH [--json]
    pretrain ckpt export PATH --out FILE.safetensors [--part encoder|model] [--dtype float32|bfloat16|float16] [--force]

PATH is a checkpoint directory (`runs/<name>/checkpoints/step_XXXXXXXX`), or a run or checkpoints
directory, which stands for its latest complete checkpoint.

`inspect` reads only meta.json and DCP's `.metadata` (tensor names, shapes and dtypes), never the
tensors, so it is instant for checkpoints of any size. `export` rebuilds the method on CPU, loads
the weights through DCP (any world size, any DCP engine) and writes the encoder's state dict (keys
as in `VisionTransformer.state_dict()`, so `load_state_dict(strict=True)` takes the file as is) or
the whole method's, with step, method and model shape in the safetensors header metadata.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

PARTS = ("encoder", "model")
DTYPES = ("float32", "bfloat16", "float16")


# ---------------------------------------------------------------------- finding a checkpoint


def resolve_checkpoint(path: str | Path) -> Path:
    """The complete checkpoint at `path`, or the latest one under a run or checkpoints directory.

    Raises FileNotFoundError naming `path` (and what is missing) when there is none."""
    from pretrain.checkpoint import META_FILE
    from pretrain.eval.run import find_checkpoint

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is a file, not a checkpoint directory")
    try:
        return find_checkpoint(path)
    except FileNotFoundError:
        if (path / ".metadata").is_file() or (path / META_FILE).is_file():
            missing = [name for name in (META_FILE, ".metadata", "rank_00000.pt") if not (path / name).is_file()]
            detail = f"missing {', '.join(missing)}" if missing else "meta.json unreadable or a rank file missing"
            raise FileNotFoundError(f"{path} is an incomplete checkpoint ({detail})") from None
        raise FileNotFoundError(
            f"no complete checkpoint at or under {path} (expected meta.json and .metadata in a step_XXXXXXXX "
            "directory, or a run/checkpoints directory holding one)"
        ) from None


# ---------------------------------------------------------------------- inspect


def _disk_usage(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _config_summary(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    from pretrain.models.vit import VIT_SIZES
    from pretrain.optim import scaled_lr

    data, model, method = config.get("data", {}), config.get("model", {}), config.get("method", {})
    optim, train = config.get("optim", {}), config.get("train", {})
    batch, accum = data.get("batch_size", 0), optim.get("accum_steps", 1)
    global_batch = batch * accum * world_size
    name = method.get("name", "?")
    size = model.get("size", "?")
    dims = VIT_SIZES.get(size)
    peak = None
    if "base_lr" in optim:
        peak = scaled_lr(
            SimpleNamespace(base_lr=optim["base_lr"], lr_scaling=optim.get("lr_scaling", "none")), global_batch
        )
    return {
        "method": name,
        "method_config": method.get(name, {}),
        "model_size": size,
        "patch_size": model.get("patch_size"),
        "image_size": data.get("image_size"),
        "in_chans": model.get("in_chans"),
        "embed_dim": dims[0] if dims else None,
        "depth": dims[1] if dims else None,
        "num_heads": dims[2] if dims else None,
        "batch_size_per_process": batch,
        "accum_steps": accum,
        "global_batch": global_batch,
        "base_lr": optim.get("base_lr"),
        "lr_scaling": optim.get("lr_scaling"),
        "peak_lr": peak,
        "min_lr": optim.get("min_lr"),
        "warmup_steps": optim.get("warmup_steps"),
        "weight_decay": optim.get("weight_decay"),
        "train_steps": train.get("steps"),
        "data_shards": data.get("shards"),
    }


def _encoder_prefix(config: dict[str, Any]) -> str | None:
    """Where the encoder sits in the method's state dict ("backbone." for MAE), from the method built
    on the meta device (no memory, no init work); None when the config cannot be built."""
    try:
        import torch

        from pretrain.config import config_from_dict
        from pretrain.methods.registry import build_method

        with torch.device("meta"):
            method = build_method(config_from_dict(config))
        return _module_prefix(method, method.encoder())
    except Exception:  # an old or foreign config: the encoder line is just left out
        return None


def _module_prefix(root, module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError("the encoder is not a submodule of the method")


def _dcp_tensor_summary(path: Path, encoder_prefix: str | None) -> dict[str, Any]:
    """Per top-level part ("model", "optim"): tensors, elements, bytes and dtypes, from DCP metadata only."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    planner = metadata.planner_data if isinstance(metadata.planner_data, dict) else {}
    parts: dict[str, dict[str, Any]] = {}
    for key, entry in metadata.state_dict_metadata.items():
        part_name = key.split(".", 1)[0]
        if part_name not in parts:
            parts[part_name] = {"tensors": 0, "elements": 0, "bytes": 0, "dtypes": {}, "other_entries": 0}
            if part_name == "model":
                parts[part_name]["parameters"] = 0
        part = parts[part_name]
        if not isinstance(entry, TensorStorageMetadata):
            part["other_entries"] += 1  # pickled values, e.g. the optimizer's param_groups
            continue
        numel = entry.size.numel()
        dtype = str(entry.properties.dtype).removeprefix("torch.")
        part["tensors"] += 1
        part["elements"] += numel
        part["bytes"] += numel * entry.properties.dtype.itemsize
        part["dtypes"][dtype] = part["dtypes"].get(dtype, 0) + numel
        if part_name == "model":
            # Non-persistent buffers (position embeddings) are not in the state dict: every tensor is a parameter.
            part["parameters"] += numel
        if part_name == "model" and encoder_prefix is not None and key.startswith(f"model.{encoder_prefix}"):
            encoder = part.setdefault("encoder", {"tensors": 0, "parameters": 0})
            encoder["tensors"] += 1
            encoder["parameters"] += numel
    if "optim" in parts and planner:
        paths = [planner[key] for key in metadata.state_dict_metadata if key.startswith("optim.") and key in planner]
        parts["optim"]["parameters_with_state"] = len({p[2] for p in paths if len(p) > 2 and p[1] == "state"})
        parts["optim"]["param_groups"] = len({p[2] for p in paths if len(p) > 2 and p[1] == "param_groups"})
    return parts


def _deepspeed_tensor_summary(path: Path) -> dict[str, Any]:
    """What DeepSpeed's small model-state file tells cheaply (memory-mapped, tensors not read): parameter
    names and shapes, ZeRO stage, number of optimizer partitions. Empty when it cannot be read."""
    import math

    import torch

    model_files = sorted(path.glob("*mp_rank_*_model_states.pt"))
    optim_files = sorted(path.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    summary: dict[str, Any] = {"optimizer_files": len(optim_files)}
    if optim_files:
        summary["optimizer_bytes"] = sum(f.stat().st_size for f in optim_files)
    if not model_files:
        return summary
    try:
        state = torch.load(model_files[0], map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # e.g. DeepSpeed classes in the pickle and no DeepSpeed installed
        summary["note"] = f"model-state file not readable here: {type(exc).__name__}: {exc}"
        return summary
    shapes: dict[str, Any] = {}
    for group in state.get("param_shapes") or []:
        shapes.update(group)
    config = state.get("ds_config") or {}
    summary["zero_stage"] = config.get("zero_optimization", {}).get("stage")
    summary["bf16"] = bool(config.get("bf16", {}).get("enabled", False))
    summary["ds_version"] = state.get("ds_version")
    if shapes:
        summary["model"] = {"tensors": len(shapes), "parameters": sum(math.prod(s) for s in shapes.values())}
    return summary


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Everything `pretrain ckpt inspect` shows, as a JSON-ready dict."""
    from pretrain.checkpoint import read_meta

    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    config = meta.get("config", {})
    world_size = meta.get("world_size", 1)
    total_bytes, num_files = _disk_usage(ckpt)
    info: dict[str, Any] = {
        "checkpoint": str(ckpt),
        "step": meta.get("step"),
        "engine": meta.get("engine"),
        "format": meta.get("format", "dcp"),
        "format_version": meta.get("format_version"),
        "world_size": world_size,
        "saved_at": meta.get("saved_at"),
        "samples_seen": meta.get("samples_seen"),
        "mlflow_run_id": meta.get("mlflow_run_id"),
        "config": _config_summary(config, world_size),
        "disk": {"bytes": total_bytes, "files": num_files},
    }
    if info["format"] == "dcp":
        info["tensors"] = _dcp_tensor_summary(ckpt, _encoder_prefix(config))
    elif info["format"] == "deepspeed":
        info["deepspeed"] = _deepspeed_tensor_summary(ckpt)
    return info


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # unreachable


def _dtypes(part: dict[str, Any]) -> str:
    return "/".join(sorted(part.get("dtypes", {}), key=lambda d: -part["dtypes"][d])) or "-"


def format_report(info: dict[str, Any]) -> str:
    c = info["config"]
    lines = [
        ("checkpoint", info["checkpoint"]),
        ("step", f"{info['step']} of {c['train_steps']} (train.steps)"),
        ("engine", f"{info['engine']}, format {info['format']}, world size {info['world_size']}"),
        ("saved at", info["saved_at"]),
        ("samples seen", f"{info['samples_seen']:,}" if isinstance(info["samples_seen"], int) else "?"),
        ("mlflow run", info["mlflow_run_id"] or "-"),
    ]
    model = f"ViT-{c['model_size']}/{c['patch_size']}"
    if c["embed_dim"]:
        model += f" ({c['embed_dim']} dim, {c['depth']} blocks, {c['num_heads']} heads)"
    lines.append(("model", f"{model}, image {c['image_size']}px, {c['in_chans']} channels"))
    method_cfg = ", ".join(f"{k}={v}" for k, v in c["method_config"].items())
    lines.append(("method", c["method"] + (f" ({method_cfg})" if method_cfg else "")))
    lines.append(
        (
            "global batch",
            f"{c['global_batch']} = {c['batch_size_per_process']} per process x {c['accum_steps']} accum "
            f"x {info['world_size']} process{'es' if info['world_size'] != 1 else ''}",
        )
    )
    peak = f"{c['peak_lr']:.3g}" if c["peak_lr"] is not None else "?"
    lines.append(
        (
            "lr",
            f"peak {peak} (base_lr {c['base_lr']}, {c['lr_scaling']} scaling), warmup {c['warmup_steps']} steps, "
            f"cosine to min_lr {c['min_lr']}, weight decay {c['weight_decay']}",
        )
    )
    lines.append(("on disk", f"{_bytes(info['disk']['bytes'])} in {info['disk']['files']} files"))
    tensors = info.get("tensors", {})
    if "model" in tensors:
        m = tensors["model"]
        text = f"{m['tensors']} tensors, {m['parameters']:,} parameters ({_bytes(m['bytes'])} {_dtypes(m)})"
        if "encoder" in m:
            text += f"; encoder {m['encoder']['tensors']} tensors, {m['encoder']['parameters']:,} parameters"
        lines.append(("model state", text))
    if "optim" in tensors:
        o = tensors["optim"]
        text = f"{o['tensors']} tensors, {o['elements']:,} elements ({_bytes(o['bytes'])} {_dtypes(o)})"
        if "parameters_with_state" in o:
            text += f"; state for {o['parameters_with_state']} parameters in {o['param_groups']} groups"
        lines.append(("optimizer state", text))
    for name, part in tensors.items():
        if name not in ("model", "optim"):
            lines.append((f"{name} state", f"{part['tensors']} tensors, {part['elements']:,} elements"))
    if "deepspeed" in info:
        ds = info["deepspeed"]
        if "model" in ds:
            lines.append(("model state", f"{ds['model']['tensors']} tensors, {ds['model']['parameters']:,} parameters"))
        text = f"ZeRO stage {ds.get('zero_stage', '?')}, {ds['optimizer_files']} optimizer partitions"
        if "optimizer_bytes" in ds:
            text += f" ({_bytes(ds['optimizer_bytes'])})"
        lines.append(("deepspeed", text))
        if "note" in ds:
            lines.append(("note", ds["note"]))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


# ---------------------------------------------------------------------- export


def _load_weights(ckpt: Path, meta: dict[str, Any]):
    """(config, method with the checkpoint's weights on CPU)."""
    fmt = meta.get("format", "dcp")
    if fmt == "dcp":
        from pretrain.eval.run import load_method

        cfg, method, _ = load_method(ckpt)
        return cfg, method
    if fmt == "deepspeed":
        return _load_deepspeed(ckpt, meta)
    raise ValueError(f"{ckpt}: unknown checkpoint format {fmt!r}")


def _load_deepspeed(ckpt: Path, meta: dict[str, Any]):
    """fp32 weights of a DeepSpeed ZeRO checkpoint (any stage), merged by DeepSpeed's zero_to_fp32."""
    import contextlib

    from pretrain.config import config_from_dict
    from pretrain.methods.registry import build_method

    cfg = config_from_dict(meta["config"])
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
    import torch
    from safetensors.torch import save_file

    from pretrain.checkpoint import read_meta

    if part not in PARTS:
        raise ValueError(f"--part must be one of {', '.join(PARTS)}, not {part!r}")
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; pass --force to overwrite it")
    if out.is_dir():
        raise IsADirectoryError(f"{out} is a directory; --out must name a file")
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    cfg, method = _load_weights(ckpt, meta)
    module = method.encoder() if part == "encoder" else method
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


# ---------------------------------------------------------------------- command line


def _fail(exc: BaseException) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_inspect(args: argparse.Namespace) -> int:
    try:
        info = inspect_checkpoint(args.path)
    except (FileNotFoundError, ValueError, OSError) as exc:
        return _fail(exc)
    print(json.dumps(info, indent=2) if args.json else format_report(info))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    try:
        done = export_weights(args.path, args.out, part=args.part, dtype=args.dtype, force=args.force)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as exc:
        return _fail(exc)
    print(
        f"wrote {done['file']}: {done['part']} of step {done['step']}, {done['tensors']} tensors, "
        f"{done['parameters']:,} parameters, {done['dtype']}, {_bytes(done['bytes'])} (from {done['checkpoint']})"
    )
    return 0


FORMATS = ("dcp", "deepspeed")


def convert_checkpoint(path: str | Path, out: str | Path, to: str) -> Path:
    """Write the checkpoint at `path` in format `to` as the complete checkpoint directory `out`.

    Model and optimizer state are converted (through DeepSpeed's universal format); the per-rank
    files (RNG, data position, schedule) are copied; meta.json records the new format and the
    source. `out` appears atomically, like every checkpoint."""
    from pretrain.checkpoint import META_FILE, is_complete, read_meta
    from pretrain.config import config_from_dict
    from pretrain.engines.zero_convert import dcp_to_deepspeed, deepspeed_to_dcp
    from pretrain.methods.registry import build_method
    from pretrain.optim import build_optimizer

    source, out = resolve_checkpoint(path), Path(out)
    meta = read_meta(source)
    current = meta.get("format", "dcp")
    if to not in FORMATS:
        raise ValueError(f"--to: '{to}' is not one of {', '.join(FORMATS)}")
    if current == to:
        raise ValueError(f"{source} is already in {to} format")
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    cfg = config_from_dict(meta["config"])

    def method_builder():
        return build_method(cfg)

    def make_optimizer(model):  # the parameter groups of training; the values come from the checkpoint
        return build_optimizer(model, cfg.optim, cfg.optim.base_lr, model.no_weight_decay())

    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        convert = deepspeed_to_dcp if to == "dcp" else dcp_to_deepspeed
        convert(source, tmp, method_builder, make_optimizer)
        for rank_file in source.glob("rank_*.pt"):
            shutil.copy2(rank_file, tmp / rank_file.name)
        converted = {
            **meta,
            "format": to,
            "engine": "single" if to == "dcp" else "deepspeed",
            "converted_from": str(source),
        }
        (tmp / META_FILE).write_text(json.dumps(converted, indent=2, sort_keys=True))
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(out):
        raise RuntimeError(f"conversion wrote an incomplete checkpoint at {out}")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    try:
        out = convert_checkpoint(args.path, args.out, args.to)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError, OSError) as exc:
        return _fail(exc)
    print(f'wrote {out} ({args.to}); resume from it with --set train.resume="{out}"')
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `ckpt inspect`, `ckpt export` and `ckpt convert` to the top-level `pretrain` subparsers."""
    ckpt = subparsers.add_parser("ckpt", help="inspect, export or convert checkpoints")
    commands = ckpt.add_subparsers(dest="ckpt_command", required=True)
    where = "checkpoint directory, or a run/checkpoints directory (its latest complete checkpoint)"

    inspect = commands.add_parser("inspect", help="step, config summary and tensor sizes, without loading tensors")
    inspect.add_argument("path", help=where)
    inspect.add_argument("--json", action="store_true", help="print everything as JSON")
    inspect.set_defaults(func=cmd_inspect)

    export = commands.add_parser("export", help="write encoder (or whole method) weights to one .safetensors file")
    export.add_argument("path", help=where)
    export.add_argument("--out", required=True, help="the .safetensors file to write")
    export.add_argument(
        "--part",
        choices=PARTS,
        default="encoder",
        help="encoder: the backbone, keys as in its own state_dict (default); model: every weight of the method",
    )
    export.add_argument("--dtype", choices=DTYPES, default="float32", help="tensor dtype in the file (default float32)")
    export.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    export.set_defaults(func=cmd_export)

    convert = commands.add_parser("convert", help="convert between DeepSpeed and DCP checkpoints")
    convert.add_argument("path", help=where)
    convert.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    convert.add_argument("--out", required=True, help="the checkpoint directory to create")
    convert.set_defaults(func=cmd_convert)
