"""Engines: how a method is placed, wrapped, stepped and checkpointed."""

from launch.env import WorldInfo
from pretrain.config import Config
from pretrain.engines.base import Engine


def build_engine(cfg: Config, world: WorldInfo) -> Engine:
    # Imported on use: the distributed engines pull in their libraries only when chosen.
    kind = cfg.engine.kind
    if kind == "single":
        from pretrain.engines.single import SingleEngine as engine_class
    elif kind == "ddp":
        from pretrain.engines.ddp import DDPEngine as engine_class
    elif kind == "fsdp":
        from pretrain.engines.fsdp import FSDPEngine as engine_class
    elif kind == "deepspeed":
        from pretrain.engines.zero import DeepSpeedEngine as engine_class
    else:
        raise ValueError(f"engine.kind: unknown engine '{kind}'")
    return engine_class(cfg, world)
