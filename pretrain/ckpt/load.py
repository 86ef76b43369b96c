"""Rebuild the method a checkpoint was trained with, for evaluation, sampling, export and conversion."""

from __future__ import annotations

from pathlib import Path

from pretrain.checkpoint import dcp_load, find_checkpoint, read_meta
from pretrain.config import Config, apply_overrides
from pretrain.methods.base import Method
from pretrain.methods.registry import build_method
from pretrain.recipes import config_from_saved
from pretrain.rng import seed_everything


def load_method(
    checkpoint: str | Path, random_init: bool = False, overrides: list[str] | None = None
) -> tuple[Config, Method, Path]:
    """The method of a (DCP) checkpoint with its trained weights, unless `random_init`.

    A random network uses the run's seed, so it is exactly the network the run started from.
    """
    path = find_checkpoint(checkpoint)
    cfg = config_from_saved(apply_overrides(read_meta(path)["config"], overrides or []))
    seed_everything(cfg.run.seed)
    method = build_method(cfg)
    if not random_init:
        dcp_load({"model": method.state_dict()}, path)  # fills the live parameters in place
    return cfg, method.eval(), path
