"""`pretrain ckpt inspect`: step, config summary and tensor sizes of a checkpoint, from meta.json and DCP's
`.metadata` (names, shapes and dtypes) only: the tensors are never read, so it is instant at any size."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from pretrain.checkpoint import find_checkpoint, read_meta
from pretrain.ckpt.released import load_tensors_only
from pretrain.models.vit import VIT_SIZES
from pretrain.optim import scaled_lr


def _disk_usage(path: Path) -> tuple[int, int]:
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def _config_summary(config: dict[str, Any], world_size: int) -> dict[str, Any]:
    data, model, method = config.get("data", {}), config.get("model", {}), config.get("method", {})
    optim, train = config.get("optim", {}), config.get("train", {})
    batch, accum = data.get("batch_size", 0), optim.get("accum_steps", 1)
    global_batch = batch * accum * world_size
    name = method.get("name", "?")
    size = model.get("size", "?")
    arch = model.get("arch", "vit")  # configs saved before model.arch existed are ViTs
    dims = VIT_SIZES.get(size) if arch == "vit" else None
    peak = None
    if "base_lr" in optim:
        peak = scaled_lr(
            SimpleNamespace(base_lr=optim["base_lr"], lr_scaling=optim.get("lr_scaling", "none")), global_batch
        )
    return {
        "method": name,
        "method_config": method.get(name, {}),
        "arch": arch,
        "resnet_stem": model.get("resnet_stem"),
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
        "schedule": optim.get("schedule", "cosine"),
        "lr_milestones": optim.get("lr_milestones", []),
        "lr_gamma": optim.get("lr_gamma", 0.1),
        "warmup_steps": optim.get("warmup_steps"),
        "weight_decay": optim.get("weight_decay"),
        "train_steps": train.get("steps"),
        "data_shards": data.get("shards"),
    }


def _encoder_summary(config: dict[str, Any]) -> dict[str, Any] | None:
    """Where the encoder sits in the method's state dict ("backbone." for MAE) and its two parameter counts
    (trainable, and as the papers count them), from the method built on the meta device (no memory, no
    init work); None when the config cannot be built."""
    try:
        import torch

        from pretrain.methods.registry import build_method
        from pretrain.recipes import config_from_saved

        with torch.device("meta"):
            method = build_method(config_from_saved(config))
        encoder = method.inference_network()
        summary = {
            "prefix": _module_prefix(method, encoder),
            "trainable_parameters": sum(p.numel() for p in encoder.parameters() if p.requires_grad),
        }
        if hasattr(encoder, "published_parameter_count"):
            summary["published_parameters"] = encoder.published_parameter_count()
        # The averaged twins (teacher, EMA) are not trained by the optimizer: count the online network.
        online = dict(method.ema_pairs()).get(encoder)
        if online is not None:
            summary["trainable_parameters"] = sum(p.numel() for p in online.parameters() if p.requires_grad)
        return summary
    except Exception:  # an old or foreign config: the encoder line is just left out
        return None


def _module_prefix(root, module) -> str:
    for name, candidate in root.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise ValueError("the encoder is not a submodule of the method")


def _dcp_tensor_summary(path: Path, built: dict[str, Any] | None) -> dict[str, Any]:
    """Per top-level part ("model", "optim"): tensors, elements, bytes and dtypes, from DCP metadata only."""
    encoder_prefix = built["prefix"] if built else None
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
    if built and "encoder" in parts.get("model", {}):
        for key in ("trainable_parameters", "published_parameters"):
            if key in built:
                parts["model"]["encoder"][key] = built[key]
    if "optim" in parts and planner:
        paths = [planner[key] for key in metadata.state_dict_metadata if key.startswith("optim.") and key in planner]
        parts["optim"]["parameters_with_state"] = len({p[2] for p in paths if len(p) > 2 and p[1] == "state"})
        parts["optim"]["param_groups"] = len({p[2] for p in paths if len(p) > 2 and p[1] == "param_groups"})
    return parts


def _deepspeed_tensor_summary(path: Path) -> dict[str, Any]:
    """What DeepSpeed's small model-state file tells cheaply (memory-mapped, tensors not read): parameter
    names and shapes, ZeRO stage, number of optimizer partitions. Empty when it cannot be read."""
    model_files = sorted(path.glob("*mp_rank_*_model_states.pt"))
    optim_files = sorted(path.glob("*zero_pp_rank_*_mp_rank_*_optim_states.pt"))
    summary: dict[str, Any] = {"optimizer_files": len(optim_files)}
    if optim_files:
        summary["optimizer_bytes"] = sum(f.stat().st_size for f in optim_files)
    if not model_files:
        return summary
    try:  # tensors and plain containers only: inspect may be pointed at any directory, and never runs its code
        state = load_tensors_only(model_files[0], mmap=True)
    except Exception as exc:  # UnsafeCheckpointError names what the file needs
        summary["note"] = f"model-state file not readable here: {exc}"
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
    ckpt = find_checkpoint(path)
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
        info["tensors"] = _dcp_tensor_summary(ckpt, _encoder_summary(config))
    elif info["format"] == "deepspeed":
        info["deepspeed"] = _deepspeed_tensor_summary(ckpt)
    return info


def format_bytes(n: int | None) -> str:
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
    if c["arch"] != "vit":
        model = f"ResNet-{c['arch'].removeprefix('resnet')} ({c['resnet_stem']} stem)"
    else:
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
    if c["schedule"] == "step":
        steps = c["train_steps"] or 0
        decay = f"x{c['lr_gamma']} at steps {', '.join(str(round(f * steps)) for f in c['lr_milestones'])}"
    else:
        decay = f"cosine to min_lr {c['min_lr']}"
    lines.append(
        (
            "lr",
            f"peak {peak} (base_lr {c['base_lr']}, {c['lr_scaling']} scaling), warmup {c['warmup_steps']} steps, "
            f"{decay}, weight decay {c['weight_decay']}",
        )
    )
    lines.append(("on disk", f"{format_bytes(info['disk']['bytes'])} in {info['disk']['files']} files"))
    tensors = info.get("tensors", {})
    if "model" in tensors:
        m = tensors["model"]
        text = f"{m['tensors']} tensors, {m['parameters']:,} parameters ({format_bytes(m['bytes'])} {_dtypes(m)})"
        if "encoder" in m:
            text += f"; encoder {m['encoder']['tensors']} tensors, {m['encoder']['parameters']:,} parameters"
        lines.append(("model state", text))
        encoder = m.get("encoder", {})
        if "trainable_parameters" in encoder:
            text = f"{encoder['trainable_parameters']:,} trainable"
            if "published_parameters" in encoder:
                text += (
                    f", {encoder['published_parameters']:,} as the papers count them (frozen layers and fixed "
                    "position tables included; for a ViT also the 1000-class classifier of the ViT paper; for DiT "
                    "its variance outputs)"
                )
            lines.append(("encoder params", text))
    if "optim" in tensors:
        o = tensors["optim"]
        text = f"{o['tensors']} tensors, {o['elements']:,} elements ({format_bytes(o['bytes'])} {_dtypes(o)})"
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
            text += f" ({format_bytes(ds['optimizer_bytes'])})"
        lines.append(("deepspeed", text))
        if "note" in ds:
            lines.append(("note", ds["note"]))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)
