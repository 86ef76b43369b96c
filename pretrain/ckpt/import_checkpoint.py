"""`pretrain ckpt import`: a checkpoint file of the released MAE, DINO, MoCo v3 or DiT code, or a ResNet in
torchvision's layout (torchvision's own files, and the encoders of SimCLR and MoCo v1/v2 converted to it), as
one of our DCP checkpoints (step 0), which `eval knn|linear`, `ckpt export` and `sample` read and `train` starts from
(`train.init_from`).

The file is read with tensors only (`pretrain/ckpt/released.py`). Each layout is mapped to the state dict
of the method that `--config` builds; keys the file has and the method lacks (or the reverse) fail with
their list, and a shape mismatch names the key and both shapes. Fixed position tables stored in the files
are compared with the table the config computes, so a wrong `model.sincos_order` fails by name. Parts a
file does not hold (a DINO backbone file has no head, MAE's encoder files no decoder) keep their
initialization, and the checkpoint's meta.json lists them in its notes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pretrain.checkpoint import FORMAT_VERSION, CheckpointManager, dcp_save
from pretrain.ckpt.released import load_tensors_only
from pretrain.config import Config
from pretrain.methods.registry import build_method
from pretrain.recipes import load_config
from pretrain.rng import seed_everything

# --from value -> the method.name its file belongs to
SOURCES = {
    "mae": "mae",
    "dino": "dino",
    "moco_v1": "moco_v1",
    "moco_v2": "moco_v2",
    "moco_v3": "moco",
    "dit": "dit",
    "torchvision_resnet": "simclr",
}


@dataclass
class Mapped:
    """A released file in our names: `tensors` to load, `tables` (fixed tables the file stores, to compare
    with ours: our key -> (file key, tensor)), `absent` (prefixes of parts the file does not hold), notes."""

    tensors: dict[str, Tensor] = field(default_factory=dict)
    tables: dict[str, tuple[str, Tensor]] = field(default_factory=dict)
    absent: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)


def _strip(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _keys(state: Any) -> str:
    return (
        ", ".join(sorted(map(str, state))[:12]) + (" ..." if len(state) > 12 else "")
        if isinstance(state, dict)
        else type(state).__name__
    )


def _vit(state: dict[str, Tensor], ours: str, out: Mapped, fixed_table: bool, what: str) -> None:
    """A timm-layout ViT encoder (cls_token, pos_embed, patch_embed.proj, blocks, norm) into prefix `ours`."""
    for key, value in state.items():
        if key == "pos_embed" and fixed_table:
            out.tables[f"{ours}pos_embed"] = (f"{what}pos_embed", value)
        elif key.startswith("head.") or key.startswith("fc_norm."):
            out.dropped.append(f"{what}{key}")
        else:
            out.tensors[f"{ours}{key}"] = value


def map_mae(raw: Any, cfg: Config) -> Mapped:
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), dict):
        raise ValueError(f"not a released MAE file: expected a dict with 'model', found {_keys(raw)}")
    state, out = raw["model"], Mapped()
    decoder = {k: v for k, v in state.items() if k.startswith("decoder_") or k == "mask_token"}
    encoder = {k: v for k, v in state.items() if k not in decoder}
    _vit(encoder, "backbone.", out, fixed_table=True, what="model.")
    for key, value in decoder.items():
        if key == "decoder_pos_embed":
            out.tables["decoder_pos_embed"] = ("model.decoder_pos_embed", value)
        else:
            out.tensors[key] = value
    if not decoder:
        out.absent += ["mask_token", "decoder_"]
        out.notes.append("the file holds the encoder only: the MAE decoder and mask token keep their initialization")
    return out


def _dino_head(state: dict[str, Tensor], ours: str, what: str, cfg: Config, out: Mapped) -> None:
    for key, value in state.items():
        if key == "last_layer.weight_g" and cfg.method.dino.norm_last_layer:
            if not torch.allclose(value, torch.ones_like(value)):
                raise ValueError(
                    f"{what}{key}: the file's last layer has a trained norm, but method.dino.norm_last_layer = true "
                    "fixes it to 1; set method.dino.norm_last_layer = false"
                )
            out.dropped.append(f"{what}{key} (all ones: norm_last_layer)")
        else:
            out.tensors[f"{ours}{key}"] = value


def map_dino(raw: Any, cfg: Config) -> Mapped:
    if not isinstance(raw, dict):
        raise ValueError(f"not a released DINO file: expected a dict, found {type(raw).__name__}")
    out = Mapped()
    if "student" in raw or "teacher" in raw:
        for part in ("student", "teacher"):
            if not isinstance(raw.get(part), dict):
                raise ValueError(
                    f"not a released DINO training checkpoint: no '{part}' state dict (found {_keys(raw)})"
                )
        for part, backbone, head in (
            ("student", "backbone.", "head."),
            ("teacher", "teacher_backbone.", "teacher_head."),
        ):
            state = raw[part]
            state = _strip("module.", state) if all(k.startswith("module.") for k in state) else state
            known = ("backbone.", "head.")
            if unknown := [k for k in state if not k.startswith(known)]:
                raise ValueError(f"{part}: keys outside backbone./head.: {', '.join(sorted(unknown))}")
            _vit(_strip("backbone.", state), backbone, out, fixed_table=False, what=f"{part}.backbone.")
            _dino_head(_strip("head.", state), head, f"{part}.head.", cfg, out)
        center = raw.get("dino_loss", {}).get("center") if isinstance(raw.get("dino_loss"), dict) else None
        if center is not None:
            out.tensors["center"] = center.reshape(-1)
        else:
            out.absent.append("center")
            out.notes.append("no dino_loss.center in the file: the center starts at zero")
        if "epoch" in raw:
            out.notes.append(
                f"trained {raw['epoch']} epochs; schedules (teacher temperature, momentum) restart at step 0"
            )
        out.absent.append("steps_done")
        return out
    state = _strip("module.", raw) if all(k.startswith("module.") for k in raw) else raw
    state = _strip("backbone.", state) if all(k.startswith("backbone.") for k in state) else state
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise ValueError(
            f"not a released DINO file: neither 'student'/'teacher' nor a ViT backbone (cls_token, "
            f"patch_embed.proj.weight); found {_keys(raw)}"
        )
    _vit(state, "teacher_backbone.", out, fixed_table=False, what="")
    _vit(state, "backbone.", out, fixed_table=False, what="")
    out.absent += ["head.", "teacher_head.", "center", "steps_done"]
    out.notes.append(
        "a backbone-only file (the released teacher): student and teacher start from it; the DINO head keeps its initialization"
    )
    return out


def map_moco_v3(raw: Any, cfg: Config) -> Mapped:
    if not isinstance(raw, dict) or not isinstance(raw.get("state_dict"), dict):
        raise ValueError(f"not a released MoCo v3 file: expected a dict with 'state_dict', found {_keys(raw)}")
    state = raw["state_dict"]
    state = _strip("module.", state) if all(k.startswith("module.") for k in state) else state
    out = Mapped()
    running = (".running_mean", ".running_var", ".num_batches_tracked")
    parts = (
        ("base_encoder.", "backbone.", "projector."),
        ("momentum_encoder.", "momentum_backbone.", "momentum_projector."),
    )
    for prefix, backbone, projector in parts:
        encoder = _strip(prefix, state)
        if not encoder:
            raise ValueError(f"not a released MoCo v3 file: no '{prefix}' keys in state_dict (found {_keys(state)})")
        for key, value in encoder.items():
            if key.startswith("head.") and key.endswith(running):
                out.dropped.append(f"{prefix}{key}")
            elif key.startswith("head."):
                out.tensors[projector + key[len("head.") :]] = value
            elif key == "pos_embed":
                out.tables[f"{backbone}pos_embed"] = (f"{prefix}pos_embed", value)
            else:
                out.tensors[backbone + key] = value
    predictor = _strip("predictor.", state)
    last_bn = any(k.startswith("4.") for k in predictor)
    if predictor and last_bn != cfg.method.moco.predictor_last_bn:
        raise ValueError(
            f"method.moco.predictor_last_bn: the file's predictor {'ends' if last_bn else 'does not end'} in a "
            f"BatchNorm, the config says {cfg.method.moco.predictor_last_bn}"
        )
    for key, value in predictor.items():
        if key.endswith(running):
            out.dropped.append(f"predictor.{key}")
        else:
            out.tensors[f"predictor.{key}"] = value
    if not predictor:
        out.absent.append("predictor.")
        out.notes.append("no predictor in the file: it keeps its initialization")
    out.notes.append(
        "BatchNorm running statistics are dropped: our heads always normalize with batch statistics, as in training"
    )
    return out


def map_dit(raw: Any, cfg: Config) -> Mapped:
    if isinstance(raw, dict) and isinstance(raw.get("ema"), dict):
        raw = raw["ema"]  # a training checkpoint {model, ema, opt, args}: the EMA weights, as released
    if not isinstance(raw, dict) or "x_embedder.proj.weight" not in raw:
        raise ValueError(
            f"not a released DiT file: expected the EMA state dict (x_embedder.proj.weight, ...), found {_keys(raw)}"
        )
    out = Mapped()
    dit = cfg.method.dit
    rename = {"x_embedder.proj.": "x_embedder.", "y_embedder.embedding_table.": "y_embedder."}
    for key, value in raw.items():
        if key == "pos_embed":
            out.tables["model.pos_embed"] = (key, value)
            continue
        ours = key
        for old, new in rename.items():
            if key.startswith(old):
                ours = new + key[len(old) :]
        if ours.startswith("final_layer.linear.") and value.shape[0] == 2 * dit.patch_size**2 * dit.in_channels:
            # Learned sigma: per patch position the outputs are [eps (C), variance (C)]; rectified flow keeps eps.
            per_position = value.reshape(dit.patch_size**2, 2 * dit.in_channels, *value.shape[1:])
            value = per_position[:, : dit.in_channels].reshape(-1, *value.shape[1:])
            if ours.endswith("weight"):
                out.notes.append(
                    "the file's learned-sigma (variance) outputs are dropped: rectified flow predicts one velocity"
                )
        for net in ("model.", "ema."):
            out.tensors[net + ours] = value
    out.absent.append("latent_scale")
    out.notes.append(
        "the released DiT predicts DDPM noise at t in [0, 1000); this method samples a rectified-flow velocity at "
        "t in [0, 1]: the weights are a starting point for fine-tuning, not a ready sampler"
    )
    return out


# Where a ResNet sits in the files that hold one in torchvision's layout: at the top (torchvision, converted
# SimCLR files), MoCo v1/v2's query encoder, or a generic `encoder.` / `backbone.`.
RESNET_PREFIXES = ("", "encoder_q.", "encoder.", "backbone.")


def map_torchvision_resnet(raw: Any, cfg: Config) -> Mapped:
    """A torchvision-layout ResNet (conv1, bn1, layer1.0.conv1, ..., fc) into the encoder `backbone.` of a
    method with model.arch = resnet18 / resnet50; `fc` (a classifier, or MoCo v2's MLP head) is dropped and
    the method's projection head keeps its initialization."""
    if cfg.model.arch == "vit":
        raise ValueError("--from torchvision_resnet needs a config with model.arch = 'resnet18' or 'resnet50'")
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict):
        raise ValueError(f"not a ResNet state dict: found {_keys(state)}")
    state = _strip("module.", state) if state and all(k.startswith("module.") for k in state) else state
    prefix = next((p for p in RESNET_PREFIXES if f"{p}conv1.weight" in state), None)
    if prefix is None:
        raise ValueError(f"not a torchvision-layout ResNet: no conv1.weight under {RESNET_PREFIXES} ({_keys(state)})")
    out = Mapped()
    for key, value in _strip(prefix, state).items():
        if key.startswith("fc."):
            out.dropped.append(prefix + key)
        else:
            out.tensors[f"backbone.{key}"] = value
    out.absent.append("projector.")
    out.notes.append("the file holds the encoder only: the projection head keeps its initialization")
    return out


def map_moco_v1_v2(raw: Any, cfg: Config) -> Mapped:
    """A released MoCo v1/v2 checkpoint (facebookresearch/moco main_moco.py: `state_dict` with `module.`
    encoder_q.*, encoder_k.*, queue [dim, K] and queue_ptr) into the whole method, so training goes on from
    it: each encoder's torchvision-layout ResNet into `backbone.` / `key_backbone.`, its `fc` (v1: one Linear;
    v2: fc.0 -> ReLU -> fc.2) into `head.` / `key_head.` (the same indices), the queue transposed to our
    [K, dim]. The shuffle counter is not in the file and starts at 0."""
    if cfg.model.arch == "vit":
        raise ValueError(f"--from {cfg.method.name} needs a config with model.arch = 'resnet18' or 'resnet50'")
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict) or "module.encoder_q.conv1.weight" not in state:
        raise ValueError(f"not a released MoCo v1/v2 checkpoint: no module.encoder_q.conv1.weight ({_keys(state)})")
    state = _strip("module.", state)
    out = Mapped()
    for ours, theirs in (("backbone.", "encoder_q."), ("key_backbone.", "encoder_k.")):
        head = "head." if ours == "backbone." else "key_head."
        for key, value in _strip(theirs, state).items():
            if key.startswith("fc."):
                rest = key.removeprefix("fc.")
                out.tensors[head + (rest if rest[0].isdigit() else f"0.{rest}")] = value
            else:
                out.tensors[ours + key] = value
    out.tensors["queue"] = state["queue"].T
    out.tensors["queue_ptr"] = state["queue_ptr"].reshape(())
    out.absent.append("key_batches")
    out.notes.append("the shuffle counter (key_batches) is not in the file: it starts at 0")
    return out


MAPPERS: dict[str, Callable[[Any, Config], Mapped]] = {
    "mae": map_mae,
    "dino": map_dino,
    "moco_v1": map_moco_v1_v2,
    "moco_v2": map_moco_v1_v2,
    "moco_v3": map_moco_v3,
    "dit": map_dit,
    "torchvision_resnet": map_torchvision_resnet,
}


def _check(mapped: Mapped, target: dict[str, Tensor]) -> None:
    """Unknown, missing and mis-shaped keys, each listed in full."""
    unknown = sorted(k for k in mapped.tensors if k not in target)
    missing = sorted(k for k in target if k not in mapped.tensors and not any(k.startswith(p) for p in mapped.absent))
    problems = []
    if unknown:
        hint = ""
        if any(k.endswith("pos_embed") for k in unknown):
            hint = ' (the file learns its positions: set model.pos_embed = "learned_cls" or "learned")'
        problems.append(f"keys the method does not have: {', '.join(unknown)}{hint}")
    if missing:
        problems.append(f"keys the file does not have: {', '.join(missing)}")
    for key, value in mapped.tensors.items():
        if key in target and tuple(value.shape) != tuple(target[key].shape):
            problems.append(f"{key}: shape {tuple(value.shape)} in the file, {tuple(target[key].shape)} in the method")
    if problems:
        raise ValueError("the file does not fit the method of --config:\n  " + "\n  ".join(problems))


def _check_tables(mapped: Mapped, method: torch.nn.Module) -> None:
    """A fixed table in the file must be the one our config computes (the zero cls row aside)."""
    buffers = dict(method.named_buffers())
    for ours, (file_key, table) in mapped.tables.items():
        if ours not in buffers:
            raise ValueError(
                f"{file_key}: the file's position table is fixed, but model.pos_embed of the config is learned; "
                'set model.pos_embed = "sincos"'
            )
        expected = buffers[ours].reshape(-1, buffers[ours].shape[-1])
        table = table.reshape(-1, table.shape[-1]).float()
        if table.shape[0] == expected.shape[0] + 1:  # a zero cls row first (MAE, MoCo v3)
            if table[0].abs().max() > 1e-6:
                raise ValueError(f"{file_key}: the first (cls) row of the fixed table is not zero")
            table = table[1:]
        if table.shape != expected.shape:
            raise ValueError(
                f"{file_key}: shape {tuple(table.shape)} in the file, {tuple(expected.shape)} in the method"
            )
        if not torch.allclose(table, expected, atol=1e-4):
            hint = ""
            transposed = (
                expected.reshape(*[int(expected.shape[0] ** 0.5)] * 2, -1).transpose(0, 1).reshape(expected.shape)
            )
            if torch.allclose(table, transposed, atol=1e-4):
                hint = ": it is the transpose of ours; set model.sincos_order to the other orientation"
            raise ValueError(f"{file_key}: the file's fixed position table differs from the config's{hint}")


def import_checkpoint(
    source: str, file: str | Path, config: str | Path, out: str | Path, overrides: list[str] | None = None
) -> dict[str, Any]:
    """Write the released `file` (layout `source`) as a step-0 DCP checkpoint under `out`/checkpoints."""
    if source not in SOURCES:
        raise ValueError(f"--from must be one of {', '.join(SOURCES)}, not {source!r}")
    cfg = load_config(config, overrides or [])
    if cfg.method.name != SOURCES[source]:
        raise ValueError(
            f"--from {source} needs a config with method.name = {SOURCES[source]!r}; {config} has {cfg.method.name!r}"
        )
    out = Path(out)
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out}/checkpoints already exists")
    mapped = MAPPERS[source](load_tensors_only(file), cfg)
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    target = method.state_dict()
    _check(mapped, target)
    _check_tables(mapped, method)
    with torch.no_grad():
        for key, value in mapped.tensors.items():
            target[key].copy_(value.to(target[key].dtype))
    meta = {
        "format_version": FORMAT_VERSION,
        "engine": "import",
        "config": cfg.to_dict(),
        "imported_from": {
            "layout": source,
            "file": str(Path(file).resolve()),
            "notes": mapped.notes,
            "dropped": mapped.dropped,
        },
        "samples_seen": 0,
    }
    manager = CheckpointManager(out / "checkpoints", keep_last=1)
    path = manager.save(
        0, lambda directory: dcp_save({"model": method.state_dict()}, directory), {"imported": True}, meta
    )
    return {
        "checkpoint": str(path),
        "tensors": len(mapped.tensors),
        "method_parameters": sum(p.numel() for p in method.parameters()),
        "dropped": mapped.dropped,
        "notes": mapped.notes,
    }
