"""The interface between pretraining methods and the single train loop / engine."""

from abc import ABC, abstractmethod

from torch import Tensor, nn


class Method(nn.Module, ABC):
    """A pretraining method owns its networks and turns a batch into a loss dict.

    Batches hold "image" float [B, C, H, W] (normalized) and "label" long [B]. The loop calls
    `forward`, backpropagates "loss", steps the optimizer, then calls `on_step_end`; it never
    branches on which method it runs.
    """

    @abstractmethod
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, other names: detached scalars to log}."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After each optimizer step: where EMA/momentum teachers, centers and schedules update."""

    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Name -> uint8 [H, W, 3] picture for the tracker; methods with nothing to show return {}."""
        return {}

    @abstractmethod
    def encoder(self) -> nn.Module:
        """The backbone evaluated downstream (it has `forward_features`) and exported after training."""

    @abstractmethod
    def transformer_blocks(self) -> list[nn.ModuleList]:
        """Every ModuleList of transformer blocks, for the engine to wrap (FSDP, activation checkpointing, compile)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in `named_parameters`) kept out of weight decay beyond the optimizer's ndim <= 1 rule."""
        return set()
