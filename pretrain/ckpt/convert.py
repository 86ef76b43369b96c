"""`pretrain ckpt convert`: a checkpoint in the other format (DCP <-> DeepSpeed), as a new checkpoint directory.

Model and optimizer state are converted (through DeepSpeed's universal format); the per-rank files (RNG,
data position, schedule) are copied; meta.json records the new format and the source. The directory
appears atomically, through the same `publish` as every checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pretrain.checkpoint import find_checkpoint, is_complete, publish, read_meta
from pretrain.engines.deepspeed_convert import dcp_to_deepspeed, deepspeed_to_dcp
from pretrain.methods.registry import build_method
from pretrain.optim import build_optimizer
from pretrain.recipes import config_from_saved

FORMATS = ("dcp", "deepspeed")


def convert_checkpoint(path: str | Path, out: str | Path, to: str) -> Path:
    """Write the checkpoint at `path` in format `to` as the complete checkpoint directory `out`.

    Model and optimizer state are converted (through DeepSpeed's universal format); the per-rank
    files (RNG, data position, schedule) are copied; meta.json records the new format and the
    source. `out` appears atomically, like every checkpoint."""
    source, out = find_checkpoint(path), Path(out)
    meta = read_meta(source)
    current = meta.get("format", "dcp")
    if to not in FORMATS:
        raise ValueError(f"--to: '{to}' is not one of {', '.join(FORMATS)}")
    if current == to:
        raise ValueError(f"{source} is already in {to} format")
    if out.exists():
        raise FileExistsError(f"{out} already exists")
    cfg = config_from_saved(meta["config"])

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
        publish(tmp, out, converted)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not is_complete(out):
        raise RuntimeError(f"conversion wrote an incomplete checkpoint at {out}")
    return out
