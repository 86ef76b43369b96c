"""Linear probe: BN without affine + linear, lr chosen on a held-out part of train, test scored once."""

from __future__ import annotations

import json

import pytest
import torch

from pretrain.cli import main
from pretrain.eval.linear import LR_SWEEP, linear_head, linear_probe
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import tiny_overrides


def _clusters(n: int, dim: int, num_classes: int, scale: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * scale
    labels = torch.arange(num_classes).repeat(n // num_classes)
    return centers[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_head_is_batchnorm_without_affine_then_linear() -> None:
    head = linear_head(16, 5)
    assert isinstance(head[0], torch.nn.BatchNorm1d) and head[0].weight is None and head[0].bias is None
    assert head[1].out_features == 5


def test_separable_features_are_learned_and_random_labels_are_not() -> None:
    train_x, train_y = _clusters(300, 12, 3, scale=4.0, seed=0)
    test_x, test_y = _clusters(90, 12, 3, scale=4.0, seed=0)
    result = linear_probe(train_x, train_y, test_x, test_y, 3, base_lr=0.1, epochs=20, batch_size=64)
    assert result.top1 == 1.0
    assert set(result.val_top1) == {0.1 * m for m in LR_SWEEP}
    assert result.lr in result.val_top1

    noise_y = torch.randint(0, 3, (300,), generator=torch.Generator().manual_seed(3))
    chance = linear_probe(train_x, noise_y, test_x, test_y, 3, base_lr=0.1, epochs=20, batch_size=64)
    assert chance.top1 < 0.6


def test_the_test_split_does_not_choose_the_learning_rate() -> None:
    """Same train split, different test labels: the chosen lr cannot change."""
    train_x, train_y = _clusters(120, 6, 3, scale=1.0, seed=1)
    test_x, test_y = _clusters(30, 6, 3, scale=1.0, seed=2)
    a = linear_probe(train_x, train_y, test_x, test_y, 3, base_lr=0.05, epochs=5, batch_size=32)
    b = linear_probe(train_x, train_y, test_x, (test_y + 1) % 3, 3, base_lr=0.05, epochs=5, batch_size=32)
    assert a.lr == b.lr and a.val_top1 == b.val_top1


def test_eval_linear_command_on_a_checkpoint(tmp_path, digit_shards, capsys) -> None:
    cfg = load_config(None, tiny_overrides(tmp_path, digit_shards, "tracking.enabled=false", "train.steps=2"))
    Trainer(cfg).fit()
    args = ["eval", "linear", "--checkpoint", str(cfg.run_dir), "--set", "eval.linear_sweep=false", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == "step 2" and report["num_test"] == 360 and 0.1 < report["linear_top1"] <= 1.0
    assert main([*args[:-1], "--random-init"]) == 0
    assert "random init" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["eval", "linear"])  # --checkpoint is required
