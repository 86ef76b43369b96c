"""Run under torchrun by tests/test_engines.py: build MAE ViT-large under a data-memory cap that is
smaller than the full model, with or without FSDP meta-device init.

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_meta_init.py {meta|full} CAP_FRACTION

The cap is RLIMIT_DATA (private memory) set to what the process uses after start-up plus a
fraction of the full model's fp32 bytes. Run with MALLOC_MMAP_THRESHOLD_ fixed: glibc's dynamic
threshold otherwise serves the all-gathered blocks from a heap that never shrinks, and the cap
would measure fragmentation instead of what FSDP holds.
"""

from __future__ import annotations

import resource
import sys

import torch

from pretrain.distributed import destroy_distributed
from pretrain.engines import build_engine
from pretrain.methods.registry import build_method
from pretrain.recipes import load_config
from pretrain.runtime.world import world_from_env

OVERRIDES = ["engine.kind=fsdp", "model.size=large", "data.image_size=64", "model.patch_size=16", "run.device=cpu"]


def vm_data_bytes() -> int:
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmData:"))
    return kib * 1024


def main() -> None:
    mode, fraction = sys.argv[1], float(sys.argv[2])
    cfg = load_config(None, [*OVERRIDES, f"engine.fsdp.meta_init={'true' if mode == 'meta' else 'false'}"])
    with torch.device("meta"):
        full_bytes = sum(p.numel() * 4 for p in build_method(cfg).parameters())
    engine = build_engine(cfg, world_from_env())  # process group first: its threads are not model memory
    cap = vm_data_bytes() + int(fraction * full_bytes)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    with engine.init_context():
        method = build_method(cfg)
    model, _ = engine.setup(method, lambda m: torch.optim.AdamW(m.parameters()))
    with torch.no_grad():
        out = model({"image": torch.randn(2, 3, 64, 64), "label": torch.zeros(2, dtype=torch.long)})
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    print(
        f"rank {engine.world.rank}: full {full_bytes / 2**20:.0f} MiB, local params {local * 4 / 2**20:.0f} MiB, "
        f"cap {fraction:.2f} x full, loss {out['loss'].item():.4f}",
        flush=True,
    )
    assert torch.isfinite(out["loss"])
    destroy_distributed()


if __name__ == "__main__":
    main()
