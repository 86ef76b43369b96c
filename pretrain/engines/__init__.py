"""Engines: how a method is placed, wrapped, stepped and checkpointed. `ENGINES` is the one list of them.

Adding an engine is a file with an `Engine` subclass (its `options` dataclass becomes the section
engine.<name>) and one line here. The engine modules import their distributed libraries (DeepSpeed)
only when an engine is set up, so listing them costs nothing.
"""

from __future__ import annotations

import dataclasses

from pretrain.config import Config, ConfigError, EngineConfig, check_choice, with_sections
from pretrain.engines.base import Engine
from pretrain.engines.ddp import DDPEngine
from pretrain.engines.deepspeed import DeepSpeedEngine
from pretrain.engines.fsdp import FSDPEngine
from pretrain.engines.single import SingleEngine
from pretrain.runtime.world import WorldInfo

ENGINES: dict[str, type[Engine]] = {
    engine.name: engine
    for engine in (
        SingleEngine,
        DDPEngine,
        FSDPEngine,
        DeepSpeedEngine,
    )
}

# The `engine` section: the settings every engine reads plus one section per engine that has options.
EnginesConfig = with_sections(
    EngineConfig, "EnginesConfig", __name__, {name: e.options for name, e in ENGINES.items() if e.options is not None}
)


def validate_engine(cfg: Config) -> None:
    check_choice("engine.kind", cfg.engine.kind, ENGINES)
    for name, engine in ENGINES.items():
        if name == cfg.engine.kind or engine.options is None:
            continue
        # Options of an engine that is not running would be silently ignored: say so instead.
        section, default = getattr(cfg.engine, name), engine.options()
        for option in dataclasses.fields(section):
            if getattr(section, option.name) != getattr(default, option.name):
                raise ConfigError(
                    f"engine.{name}.{option.name}: only the {name} engine reads it (engine.kind is '{cfg.engine.kind}')"
                )
    ENGINES[cfg.engine.kind].validate_config(cfg)


def build_engine(cfg: Config, world: WorldInfo) -> Engine:
    return ENGINES[cfg.engine.kind](cfg, world)
