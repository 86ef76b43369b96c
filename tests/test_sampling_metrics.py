"""Metrics for generated samples: Frechet distance, the digit classifier, and the FID Inception code path
(random weights in the published parameter layout; the real weights are never downloaded)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import linalg
from test_dit_training import dit_overrides

from pretrain.eval.digit_classifier import classify, load_images, train_classifier
from pretrain.eval.frechet import frechet_distance
from pretrain.eval.inception import FIDInceptionV3, inception_features, load_fid_inception
from pretrain.recipes import load_config
from pretrain.train import Trainer


def test_frechet_distance_matches_the_matrix_square_root_formula():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    b = rng.normal(size=(300, 6)) @ rng.normal(size=(6, 6)) * 0.5 + 1.0
    mu1, mu2, c1, c2 = a.mean(0), b.mean(0), np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)
    assert frechet_distance(a, a + 2.0) == pytest.approx(6 * 4.0, rel=1e-6)  # a shift adds |d mu|^2 only


def test_digit_classifier_learns_real_digits(digit_shards):
    images, labels = load_images(str(digit_shards), "train", 16)
    test_images, test_labels = load_images(str(digit_shards), "test", 16)
    assert images.shape == (1437, 1, 16, 16) and images.min() >= -1 and images.max() <= 1
    model = train_classifier(images, labels, epochs=3)
    predicted, features = classify(model, test_images)
    assert (predicted == test_labels).float().mean() > 0.8
    assert features.shape == (len(test_images), 128)


def test_fid_inception_layout_and_weights_file(tmp_path):
    model = FIDInceptionV3()
    # torchvision's Inception v3 without aux logits has 23,834,568 parameters for 1000 classes; the FID
    # graph's fc has 1008 outputs.
    assert sum(p.numel() for p in model.parameters()) == 23_834_568 + 8 * 2048 + 8
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["Conv2d_1a_3x3.conv.weight"] == (32, 3, 3, 3)
    assert shapes["Mixed_6b.branch7x7dbl_5.conv.weight"] == (192, 128, 1, 7)
    assert shapes["Mixed_7c.branch3x3dbl_3b.bn.running_var"] == (384,)
    assert shapes["fc.weight"] == (1008, 2048)

    torch.manual_seed(0)
    state = {
        k: v if k.endswith("running_var") else v + 0.01 * torch.randn_like(v.float()).to(v.dtype)
        for k, v in model.state_dict().items()
        if not k.endswith("num_batches_tracked")
    }
    torch.save(state, tmp_path / "pt_inception.pth")
    loaded = load_fid_inception(tmp_path / "pt_inception.pth")
    assert torch.equal(loaded.Mixed_5b.branch1x1.conv.weight, state["Mixed_5b.branch1x1.conv.weight"])
    features = inception_features(loaded, torch.rand(2, 1, 16, 16))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()

    torch.save({"not": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not FID Inception weights"):
        load_fid_inception(tmp_path / "other.pth")


def test_fid_command_scores_dit_samples_with_local_inception_weights(tmp_path, digit_shards, capsys):
    from pretrain.cli import main

    checkpoint = (
        Trainer(load_config(None, dit_overrides(tmp_path, digit_shards, "train.steps=1", "optim.warmup_steps=1")))
        .fit()
        .checkpoint
    )
    weights = tmp_path / "inception.pth"
    torch.save(FIDInceptionV3().state_dict(), weights)
    args = ["eval", "fid", "--checkpoint", str(checkpoint), "--inception-weights", str(weights)]
    args += ["--shards", str(digit_shards), "--per-class", "1", "--max-real", "10", "--steps", "2", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["num_generated"] == 10 and report["num_real"] == 10 and np.isfinite(report["fid"])
