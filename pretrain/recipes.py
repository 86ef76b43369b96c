"""A recipe: a TOML file of configs/ plus `--set` overrides, loaded against the full schema (the core
sections of pretrain/config.py, every method's section and every engine's options) and validated
before any work starts."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from kernels.attention import unavailable_reason
from pretrain.config import Config, ConfigError, apply_overrides, build_section, read_toml, validate_core
from pretrain.data import validate_data_backend
from pretrain.engines import EnginesConfig, validate_engine
from pretrain.methods.registry import MethodsConfig, validate_method

log = logging.getLogger("pretrain.recipes")

# Keys that moved; a checkpoint's saved config (or an old recipe) is read through this table.
RENAMED_KEYS: dict[tuple[str, str], tuple[str, ...]] = {
    ("engine", "zero_stage"): ("engine", "deepspeed", "zero_stage"),
    ("engine", "reshard_after_forward"): ("engine", "fsdp", "reshard_after_forward"),
    ("engine", "cpu_offload"): ("engine", "fsdp", "cpu_offload"),
    ("engine", "meta_init"): ("engine", "fsdp", "meta_init"),
}


class RecipeConfig(Config):
    """Config with the registries' `method` and `engine` sections (the type `build_section` reads)."""

    method: MethodsConfig  # type: ignore[valid-type]
    engine: EnginesConfig  # type: ignore[valid-type]


def _move_renamed_keys(raw: dict[str, Any]) -> dict[str, Any]:
    for (section, key), new_path in RENAMED_KEYS.items():
        table = raw.get(section)
        if isinstance(table, dict) and key in table:
            value = table.pop(key)
            node = raw
            for part in new_path[:-1]:
                node = node.setdefault(part, {})
            node.setdefault(new_path[-1], value)
            log.info("config key %s.%s is now %s", section, key, ".".join(new_path))
    return raw


def upgrade_saved_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's saved config read with today's meanings. Saved configs hold every field, so a field
    that is missing dates the file: before `method.dit.sample_guided_channels` existed, the guidance scale
    was w of v = (1 + w) v_cond - w v_uncond, which is the paper's s = w + 1."""
    dit = raw.get("method", {}).get("dit")
    if isinstance(dit, dict) and "sample_cfg_scale" in dit and "sample_guided_channels" not in dit:
        old = dit["sample_cfg_scale"]
        dit["sample_cfg_scale"] = old + 1
        dit["sample_guided_channels"] = 0
        log.info(
            "method.dit.sample_cfg_scale: this checkpoint's %s was w of (1 + w) v_cond - w v_uncond; "
            "read as the paper's s = %s",
            old,
            old + 1,
        )
    return raw


def validate(cfg: Config) -> None:
    """Every check there is, core sections first; the first failure names its key."""
    validate_core(cfg)
    if why := unavailable_reason(cfg.model.attn_backend):  # a known backend whose package is missing
        raise ConfigError(f"model.attn_backend: {why}")
    validate_engine(cfg)
    validate_method(cfg)
    validate_data_backend(cfg)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """A config from plain data (a parsed TOML file, or the config a checkpoint saved), type-checked and validated."""
    cfg = build_section(RecipeConfig, _move_renamed_keys(raw))
    validate(cfg)
    return cfg


def config_from_saved(raw: dict[str, Any]) -> Config:
    """The config a checkpoint saved (meta.json), upgraded to today's meanings, type-checked and validated."""
    return config_from_dict(upgrade_saved_config(copy.deepcopy(raw)))


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a TOML file (or defaults), apply overrides, type-check and validate."""
    raw = read_toml(path) if path is not None else {}
    return config_from_dict(apply_overrides(raw, overrides or []))


def default_config() -> Config:
    return config_from_dict({})
