"""Reading checkpoint files that this system did not write (the released MAE, DINO, MoCo v3 and DiT files,
and DeepSpeed's pickles): tensors and plain containers only, never code.

`torch.load(..., weights_only=True)` unpickles tensors, numbers, strings and lists/dicts/tuples and refuses
anything else (a class to import, a function to call); a file that needs more fails here with a message
that says so, rather than running code it carries.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class UnsafeCheckpointError(ValueError):
    """The file needs more than tensors and plain containers to load."""


def load_tensors_only(path: str | Path, mmap: bool = False) -> Any:
    """The file's content, loaded with weights_only=True on the CPU; UnsafeCheckpointError when it holds
    objects other than tensors and plain containers (they would need their code executed to load)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise UnsafeCheckpointError(
            f"{path} needs more than tensors and plain containers to load ({first_line}); files are read with "
            "torch.load(weights_only=True) and their code is never executed. Save just the tensors, e.g. "
            "torch.save({k: v for k, v in state.items() if isinstance(v, (torch.Tensor, dict))}, path)"
        ) from exc
