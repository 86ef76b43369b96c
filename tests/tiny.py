"""The tiny MAE run the end-to-end tests share, and exact comparison of nested states."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    """ViT-tiny/4 on 16 px digits with a 1-block decoder: seconds per run on 2 CPU cores."""
    return [
        f'run.output_dir="{out}"',
        "run.name=tiny",
        f'data.shards="{shards}"',
        "data.image_size=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=50",
        "data.pin_memory=false",
        "model.size=tiny",
        "model.patch_size=4",
        "method.mae.decoder_dim=32",
        "method.mae.decoder_depth=1",
        "method.mae.decoder_heads=2",
        "optim.base_lr=1e-3",
        "optim.warmup_steps=2",
        "optim.grad_clip=1.0",
        "train.steps=6",
        "train.log_every=1",
        "train.ckpt_every=0",
        *extra,
    ]


def assert_equal_states(a, b, where: str = "") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values, naming the first difference."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"tensor differs at {where}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"keys differ at {where}"
        for key in a:
            assert_equal_states(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"lengths differ at {where}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_states(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"value differs at {where}: {a!r} != {b!r}"
