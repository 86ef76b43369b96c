"""What the Triton paths need to know about this process: is triton installed, and do kernels run interpreted.

Interpretation is a per-process decision: triton reads TRITON_INTERPRET when it is imported (its own
library functions such as tl.sum are jitted then) and `@triton.jit` when a kernel is defined. So the
kernel modules are imported lazily, only when a Triton path runs, and record `INTERPRETED` at import;
to interpret, set TRITON_INTERPRET=1 before anything imports triton.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable


def triton_available() -> bool:
    """True when the triton package can be imported (it is a dependency, but may be absent on odd platforms)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """True when TRITON_INTERPRET asks for the interpreter (kernels then run on the CPU through numpy)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def autotune_unless_interpreted(configs: list, key: list[str]) -> Callable:
    """triton.autotune on a GPU; the identity under the interpreter, where timing configs is meaningless
    and the launcher passes one fixed small block size instead."""
    if interpreting():
        return lambda fn: fn
    import triton

    return triton.autotune(configs=configs, key=key)
