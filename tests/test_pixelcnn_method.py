"""The PixelCNN method on the loop: integer pixels in, nats per dimension out, exact resume, `pretrain eval nll`
against a direct computation, `pretrain sample`, config errors, and two ranks (DDP, FSDP) equal to one process."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from engine_runs import CASES, check_case
from PIL import Image

from data_pipeline.sources import digits_samples
from pretrain.ckpt.load import load_method
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.methods.pixelcnn import eval_transform, pixel_transform, preflight
from pretrain.methods.registry import build_method
from pretrain.models.pixel_likelihood import categorical_nll
from pretrain.recipes import load_config

from tiny import check_resume, tiny_overrides

PIXELCNN_TINY = [
    "method.name=pixelcnn",
    "method.pixelcnn.channels=1",
    "method.pixelcnn.hidden_channels=8",
    "method.pixelcnn.layers=3",
    "method.pixelcnn.first_kernel_size=5",
    "method.pixelcnn.num_classes=10",
    "method.pixelcnn.vis_samples=2",
    "data.crop_scale=[1.0, 1.0]",
    "data.hflip=0.0",
    "optim.weight_decay=0.0",
]


def pixelcnn_config(out, shards, *extra: str):
    return load_config(None, tiny_overrides(out, shards, "tracking.enabled=false", *PIXELCNN_TINY, *extra))


def test_the_transform_keeps_the_images_integer_values():
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    image = Image.fromarray(rgb)
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(pixel_transform(16, 3)(image, generator), torch.from_numpy(rgb).permute(2, 0, 1))
    gray = pixel_transform(16, 1)(image, generator)
    assert gray.dtype == torch.uint8 and torch.equal(gray[0], torch.from_numpy(np.array(image.convert("L"))))


def test_the_loss_is_nats_per_dimension_and_the_metric_bits():
    cfg = load_config(None, ["data.image_size=8", *PIXELCNN_TINY])
    torch.manual_seed(0)
    method = build_method(cfg)
    x = torch.randint(0, 256, (4, 1, 8, 8))
    labels = torch.tensor([0, 3, 3, 9])
    out = method({"image": x, "label": labels})
    nll = categorical_nll(method.model(x, labels), x)  # nats per image
    torch.testing.assert_close(out["loss"], nll.mean() / 64)
    torch.testing.assert_close(out["bits_per_dim"], nll.mean() / 64 / math.log(2))
    assert 7.5 < float(out["bits_per_dim"]) < 8.5  # an untrained model is close to uniform: 8 bits
    with pytest.raises(ValueError, match="integer pixels"):
        method({"image": x.float(), "label": labels})


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["method.pixelcnn.kernel_size=4"], "method.pixelcnn.kernel_size"),
        (["method.pixelcnn.channels=3", "method.pixelcnn.hidden_channels=8"], "method.pixelcnn.hidden_channels"),
        (["method.pixelcnn.channels=2"], "method.pixelcnn.channels"),
    ],
)
def test_bad_settings_fail_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [*PIXELCNN_TINY, *overrides])


def test_a_conditional_model_with_fewer_classes_than_the_data_fails_before_any_work(tmp_path, digit_shards):
    preflight(pixelcnn_config(tmp_path, digit_shards))
    with pytest.raises(ConfigError, match=r"method\.pixelcnn\.num_classes: 5 classes, the data .* has 10"):
        preflight(pixelcnn_config(tmp_path, digit_shards, "method.pixelcnn.num_classes=5"))


def test_resume_is_bit_identical_and_the_checkpoint_scores_and_samples(tmp_path, digit_shards, capsys):
    full, _, _ = check_resume(lambda out, *extra: pixelcnn_config(out, digit_shards, *extra), tmp_path)

    # `pretrain eval nll`: the mean over every test image, against the model applied directly.
    assert main(["eval", "nll", "--checkpoint", str(full.checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    loaded_cfg, method, _ = load_method(full.checkpoint)
    transform, generator = eval_transform(loaded_cfg), torch.Generator()
    test = [sample for sample in digits_samples(16) if sample.split == "test"]  # the shards' test split (PNG)
    x = torch.stack([transform(sample.image, generator) for sample in test])
    y = torch.tensor([sample.label for sample in test])
    with torch.no_grad():
        direct = float(method.model.nll(method.model(x, y), x).double().mean()) / x[0].numel() / math.log(2)
    assert report["images"] == len(test) and report["dims_per_image"] == 256
    assert report["bits_per_dim"] == pytest.approx(direct, rel=1e-6)

    out = tmp_path / "grid.png"
    assert main(["sample", "--checkpoint", str(full.checkpoint), "--class", "3", "--num", "4", "--out", str(out)]) == 0
    assert "pixel by pixel" in capsys.readouterr().out
    with Image.open(out) as picture:
        assert picture.size == (2 * 18 + 2, 2 * 18 + 2)  # 2 x 2 samples of 16 px, 2 px apart
    assert main(["eval", "nll", "--checkpoint", str(full.checkpoint), "--split", "nosuch"]) == 2


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("pixelcnn")])
def test_two_ranks_match_one_process(engine_runs, case) -> None:
    state = check_case(engine_runs, case)
    assert any(name.startswith("model.layers.") for name in state)
