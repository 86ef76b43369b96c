"""Capture and restore every random number generator a step depends on (exact resume needs all)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from data_pipeline.reader import derive_seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_step(seed: int, step: int, index: int) -> None:
    """Seed torch's generators for one micro-batch from (seed, step, its index in the global batch)."""
    torch.manual_seed(derive_seed(seed, "step", step, index))
