"""What engines apply to a method from outside: global BatchNorm, and on its blocks activation checkpointing
and compile."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from pretrain.engines.batch_norm import convert_to_global_batch_norm
from pretrain.methods.base import Method


def _replace_blocks(method: Method, wrap) -> None:
    for blocks in method.transformer_blocks():
        for index, block in enumerate(blocks):
            blocks[index] = wrap(block)


def apply_activation_checkpointing(method: Method) -> None:
    """Recompute each block in backward: activation memory drops from O(depth) blocks to about one. Blocks that
    draw random numbers (stochastic depth) replay the RNG state of their forward, so the recompute drops the
    same samples; the others skip that save and restore."""
    _replace_blocks(
        method,
        lambda block: checkpoint_wrapper(block, preserve_rng_state=bool(getattr(block, "uses_randomness", False))),
    )


def apply_compile(method: Method) -> None:
    """Compile blocks one by one: identical blocks share one compiled graph, so compile time stays flat in depth."""
    _replace_blocks(method, lambda block: torch.compile(block, fullgraph=True))


def prepare_blocks(method: Method, activation_checkpointing: bool, compile_blocks: bool) -> nn.Module:
    # BatchNorm statistics over the global batch on every engine (a no-op for methods without BatchNorm).
    convert_to_global_batch_norm(method)
    if activation_checkpointing:
        apply_activation_checkpointing(method)
    if compile_blocks:
        apply_compile(method)
    return method
