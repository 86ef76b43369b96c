"""The interface between pretraining methods and the single train loop / engine."""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from pretrain.config import PlayerSettings


@dataclass(frozen=True)
class Player:
    """A network a method trains with an optimizer of its own: the parameters under `modules` (attribute names of
    the method), and its settings (learning rate, betas, schedule, clipping, update ratio)."""

    name: str
    modules: tuple[str, ...]
    settings: PlayerSettings


class Method(nn.Module, ABC):
    """A pretraining method owns its networks and turns a batch into a loss dict.

    Batches hold "image" float [B, C, H, W] (normalized) and "label" long [B]. The loop calls
    `forward`, backpropagates "loss", steps the optimizer, then calls `on_step_end`; it never
    branches on which method it runs.
    """

    @abstractmethod
    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """{"loss": scalar to backpropagate, other names: detached scalars to log}."""

    def players(self) -> list[Player]:
        """The networks trained by optimizers of their own, in the order they update within a step; [] (the
        default): one optimizer over every trainable parameter and `forward(batch)`. With players the loop calls
        `forward(batch, player=name)` for each player due at the step, backpropagates its "loss" and steps only
        that player's parameters (gradients reaching the others' are dropped)."""
        return []

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After each optimizer step (and the EMA update): schedules and other per-step state."""

    def ema_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """(averaged, online) module pairs: after each optimizer step the engine moves every averaged
        parameter toward its online twin, p_avg = m * p_avg + (1 - m) * p_online (momentum teachers, EMA
        weights). The engine does it because only it knows how parameters are sharded."""
        return []

    @torch.no_grad()
    def copy_online_to_averaged(self) -> None:
        """Start every averaged network of `ema_pairs` equal to its online twin (at init, after meta init)."""
        for averaged, online in self.ema_pairs():
            for avg, src in zip(averaged.parameters(), online.parameters()):
                avg.copy_(src)

    def ema_momentum(self, step: int, total_steps: int) -> float:
        """m for the update after optimizer step `step` (1-based); used only when `ema_pairs` is non-empty."""
        raise NotImplementedError(f"{type(self).__name__} has ema_pairs but no ema_momentum")

    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """Name -> uint8 [H, W, 3] picture for the tracker; methods with nothing to show return {}."""
        return {}

    @abstractmethod
    def inference_network(self) -> nn.Module:
        """The network used after training: evaluated (kNN, linear probe: it has `forward_features`), sampled
        from and exported. An encoder for the SSL methods (DINO's teacher), the EMA network for DiT, the
        autoencoder for the VAE."""

    @abstractmethod
    def transformer_blocks(self) -> list[nn.ModuleList]:
        """Every ModuleList of transformer blocks, for the engine to wrap (FSDP, activation checkpointing, compile)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (as in `named_parameters`) kept out of weight decay beyond the optimizer's ndim <= 1 rule."""
        return set()

    def test_classifier(self) -> nn.Module | None:
        """A network mapping images to class logits, which the loop scores on the test split at the end of the
        run (a fine-tune's); None for methods that train no classifier."""
        return None

    def lr_scale(self, name: str) -> float:
        """The learning-rate multiplier of a parameter (fine-tuning's layer-wise decay). `name` is as in
        `named_parameters` after the engine wrapped blocks (activation checkpointing, compile add segments)."""
        return 1.0

    def initial_state(self, encoder: dict[str, Tensor]) -> dict[str, Tensor]:
        """A new run's starting weights from a pretrained encoder's (under the encoder's own names), as full
        tensors under this method's `state_dict` names: how a fine-tune takes its encoder. Called only for
        methods whose spec names an `encoder_checkpoint`; the loop loads the result before the engine shards
        the method (into the shards, when it is built on the meta device), and never on resume."""
        raise NotImplementedError(f"{type(self).__name__} does not start from a pretrained encoder")

    def teacher_sources(self) -> tuple[str, ...]:
        """Name prefixes of the tensors a distillation reads from its teacher checkpoint's method state."""
        raise NotImplementedError(f"{type(self).__name__} does not distill a pretrained teacher")

    def teacher_state(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """The frozen teacher's weights, as full tensors under this method's `state_dict` names, from its
        checkpoint's tensors under `teacher_sources` (the teacher's run's names). Called as `initial_state` is."""
        raise NotImplementedError(f"{type(self).__name__} does not distill a pretrained teacher")
