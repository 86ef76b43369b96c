"""Transforms: shapes and ranges, reproducibility from the generator alone, crop statistics, flips."""

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    CenterCropResize,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    ToTensor,
    eval_transform,
    mae_transform,
)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_transforms_output_shapes_and_ranges():
    img = _random_image(40, 30)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for transform in [mae_transform(16), eval_transform(16)]:
        out = transform(img, _gen(0))
        assert out.shape == (3, 16, 16) and out.dtype == torch.float32
        pixels = out * std + mean
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    tensor = ToTensor()(img)
    assert tensor.shape == (3, 30, 40) and 0 <= tensor.min() and tensor.max() <= 1
    assert torch.equal(tensor[:, 2, 5], torch.tensor(np.asarray(img)[2, 5], dtype=torch.float32) / 255)
    normalized = Normalize((0.5, 0.25, 0.0), (0.5, 0.5, 2.0))(torch.ones(3, 2, 2))
    assert torch.allclose(normalized[:, 0, 0], torch.tensor([1.0, 1.5, 0.5]))


def test_same_generator_seed_gives_identical_output():
    img = _random_image(64, 48, seed=1)
    transform = mae_transform(24)
    first = transform(img, _gen(123))
    torch.manual_seed(999)  # global RNG state must not matter
    assert torch.equal(first, transform(img, _gen(123)))
    assert not torch.equal(first, transform(img, _gen(124)))


def test_random_resized_crop_boxes_respect_scale_and_ratio():
    crop = RandomResizedCrop(8, scale=(0.2, 1.0), ratio=(3 / 4, 4 / 3))
    width, height = 120, 90
    gen = _gen(0)
    areas, ratios = [], []
    for _ in range(2000):
        left, top, w, h = crop.crop_box(width, height, gen)
        assert 0 <= left and 0 <= top and left + w <= width and top + h <= height and w > 0 and h > 0
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    areas, ratios = np.array(areas), np.array(ratios)
    rounding = 2 / 90  # one pixel of rounding on each side
    assert areas.min() >= 0.2 - rounding and areas.max() <= 1.0
    assert ratios.min() >= 3 / 4 - rounding * 2 and ratios.max() <= 4 / 3 + rounding * 2
    assert areas.min() < 0.25 and areas.max() > 0.9  # the whole range is used
    assert np.log(ratios).mean() == pytest.approx(0.0, abs=0.05)  # log-uniform aspect, symmetric


def test_random_resized_crop_falls_back_to_a_ratio_clamped_center_crop():
    crop = RandomResizedCrop(8, scale=(1.0, 1.0), ratio=(3 / 4, 4 / 3))
    assert crop.crop_box(200, 20, _gen(0)) == ((200 - 27) // 2, 0, 27, 20)  # too wide: no try fits
    assert crop.crop_box(20, 200, _gen(0)) == (0, (200 - 27) // 2, 20, 27)  # too tall
    img = _random_image(200, 20)
    expected = img.crop((86, 0, 113, 20)).resize((8, 8), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(crop(img, _gen(0))), np.asarray(expected))


def test_horizontal_flip_mirrors_with_probability_p():
    img = _random_image(9, 5)
    mirrored = np.asarray(img)[:, ::-1]
    assert np.array_equal(np.asarray(RandomHorizontalFlip(1.0)(img, _gen(0))), mirrored)
    assert np.array_equal(np.asarray(RandomHorizontalFlip(0.0)(img, _gen(0))), np.asarray(img))
    tensor = ToTensor()(img)
    assert torch.equal(RandomHorizontalFlip(1.0)(tensor, _gen(0)), tensor.flip(-1))
    flips = sum(np.array_equal(np.asarray(RandomHorizontalFlip(0.5)(img, _gen(seed))), mirrored) for seed in range(400))
    assert 150 < flips < 250
    with pytest.raises(ValueError, match="p must be in"):
        RandomHorizontalFlip(1.5)


def test_center_crop_resize_takes_the_central_square():
    img = _random_image(100, 50)
    out = CenterCropResize(20, crop_fraction=1.0)(img)
    expected = img.crop((25, 0, 75, 50)).resize((20, 20), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
    out = CenterCropResize(20, crop_fraction=0.875)(img)  # side round(50 * 0.875) = 44
    expected = img.crop((28, 3, 72, 47)).resize((20, 20), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(out), np.asarray(expected))
