"""Engines: how a method is placed, wrapped, stepped and checkpointed (single process today)."""

from launch.env import WorldInfo
from pretrain.config import Config
from pretrain.engines.base import Engine
from pretrain.engines.single import SingleEngine

ENGINES: dict[str, type[Engine]] = {"single": SingleEngine}


def build_engine(cfg: Config, world: WorldInfo) -> Engine:
    return ENGINES[cfg.engine.kind](cfg, world)
