"""The tiny MAE run the end-to-end tests share, and exact comparison of nested states."""

from __future__ import annotations

import math
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


def check_resume(config, root: Path, what: str = "model", optimizer: bool = False):
    """Train `config(out, *extra)` straight, and again stopped after step 3 and resumed: the losses must be equal
    and finite, and the two final checkpoints must load to bitwise-equal states (the method's, and with
    `optimizer` the optimizer's too). Returns (the straight run's result, a trainer holding the resumed run's
    final state, that state)."""
    import copy

    from pretrain.train import Trainer

    full = Trainer(config(root / "straight")).fit()
    first = Trainer(config(root / "split")).fit(until=3)
    resumed = Trainer(config(root / "split"))
    assert resumed.step == 3
    second = resumed.fit()
    assert first.losses + second.losses == full.losses
    assert all(math.isfinite(loss) for loss in full.losses)
    straight = Trainer(config(root / "straight", "train.resume=none"))
    states = []
    for checkpoint in (full.checkpoint, second.checkpoint):
        straight.engine.load_tensors(straight.model, straight.optimizer, checkpoint)
        state = copy.deepcopy(straight.model.state_dict())
        states.append((state, copy.deepcopy(straight.optimizer.state_dict())) if optimizer else state)
    assert_equal_states(states[1], states[0], what)
    return full, straight, states[1]


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


def lpips_files(directory: Path) -> tuple[Path, Path]:
    """A random LPIPS saved as its two local weight files (torchvision's VGG16 layout, lpips' v0.1 layout), with
    positive linear weights as the released ones are."""
    from pretrain.models.lpips import LPIPS

    generator = torch.Generator().manual_seed(0)
    network = LPIPS()
    with torch.no_grad():
        for tensor in network.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.05)
        for lin in network.lins:
            lin.weight.copy_(torch.rand(lin.weight.shape, generator=generator) + 0.01)
    vgg, lin = directory / "vgg16.pth", directory / "vgg.pth"
    torch.save({f"features.{k}": v for k, v in network.net.features.state_dict().items()}, vgg)
    torch.save({f"lin{i}.model.1.weight": layer.weight for i, layer in enumerate(network.lins)}, lin)
    return vgg, lin
