"""Color augmentations against their formulas and PIL, batched vs per sample, and multi-crop views."""

from __future__ import annotations

import colorsys

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance

from data_pipeline.color import (
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    grayscale,
    hsv_to_rgb,
    rgb_to_hsv,
    solarize,
)
from data_pipeline.views import ColorAugment, DeviceColor, MultiView, joint_embedding_views
from pretrain.recipes import load_config


def _images(n: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _pil(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def _from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255


def test_brightness_and_saturation_match_pil_enhance() -> None:
    x = _from_pil(_pil(_images(1)[0]))  # start from exactly representable 8-bit values
    for factor in (0.6, 1.3):
        ours = adjust_brightness(x[None], torch.tensor([factor]))[0]
        pil = _from_pil(ImageEnhance.Brightness(_pil(x)).enhance(factor))
        assert (ours - pil).abs().max() <= 1.5 / 255
        ours = adjust_saturation(x[None], torch.tensor([factor]))[0]
        pil = _from_pil(ImageEnhance.Color(_pil(x)).enhance(factor))
        assert (ours - pil).abs().max() <= 2.5 / 255


def test_contrast_blends_toward_the_mean_gray() -> None:
    x = _images(2)
    out = adjust_contrast(x, torch.tensor([0.0, 1.0]))
    mean = grayscale(x[:1]).mean()
    torch.testing.assert_close(out[0], torch.full_like(out[0], float(mean)))
    torch.testing.assert_close(out[1], x[1])


def test_hsv_round_trip_and_hue_rotation_match_colorsys() -> None:
    x = _images(2, 5)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(x)), x, atol=1e-5, rtol=0)
    r, g, b = x[0, :, 2, 3].tolist()
    h, s, v = colorsys.rgb_to_hsv(r, g, b)
    expected = colorsys.hsv_to_rgb((h + 0.25) % 1.0, s, v)
    shifted = adjust_hue(x, torch.tensor([0.25, 0.0]))
    torch.testing.assert_close(shifted[0, :, 2, 3], torch.tensor(expected, dtype=torch.float32), atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted[1], x[1], atol=1e-5, rtol=0)


def test_blur_keeps_flat_images_and_smooths_noise() -> None:
    flat = torch.full((2, 3, 10, 10), 0.3)
    torch.testing.assert_close(gaussian_blur(flat, torch.tensor([0.5, 2.0]), 5), flat)
    noise = _images(2, 16)
    blurred = gaussian_blur(noise, torch.tensor([0.1, 2.0]), 5)
    assert (blurred[0] - noise[0]).abs().max() < 1e-3  # sigma 0.1: the kernel is a delta
    assert blurred[1].std() < 0.5 * noise[1].std()
    assert blur_kernel_size(224) == 23 and blur_kernel_size(32) == 3 and blur_kernel_size(96) == 9
    with pytest.raises(ValueError, match="odd"):
        gaussian_blur(flat, torch.tensor([1.0, 1.0]), 4)


def test_solarize_inverts_bright_values_only() -> None:
    x = torch.tensor([0.0, 0.49, 0.5, 0.9]).view(1, 1, 1, 4).expand(1, 3, 1, 4)
    torch.testing.assert_close(solarize(x)[0, 0, 0], torch.tensor([0.0, 0.49, 0.5, 0.1]))


def test_batched_color_equals_per_sample_with_the_same_draws() -> None:
    """The device path (one batch) and the worker path (one sample at a time) compute the same pixels."""
    color = ColorAugment(jitter_prob=1.0, grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.5, blur_kernel=3)
    x = _images(8)
    params = color.sample(8, torch.Generator().manual_seed(3))
    batched = color.apply(x, params)
    for i in range(8):
        single = color.apply(x[i : i + 1], {name: value[i : i + 1] for name, value in params.items()})
        torch.testing.assert_close(batched[i : i + 1], single, atol=1e-6, rtol=0)
    assert not torch.equal(batched, x)
    assert params["order"].sort(dim=1).values.eq(torch.arange(4)).all()  # each row is a permutation


def test_color_probabilities_are_respected() -> None:
    params = ColorAugment(jitter_prob=0.8, grayscale_prob=0.2, blur_prob=0.0).sample(4000, torch.Generator())
    assert abs(params["jitter"].float().mean() - 0.8) < 0.03
    assert abs(params["grayscale"].float().mean() - 0.2) < 0.03
    assert not params["blur"].any()
    assert params["factors"][:, 3].abs().max() <= 0.1 + 1e-6


def _dino_data(**changes):
    overrides = [
        "data.image_size=32",
        "data.local_crops=3",
        "data.local_crop_size=16",
        "model.patch_size=4",
        *(f"data.{k}={v}" for k, v in changes.items()),
    ]
    return load_config(None, overrides).data


def test_multicrop_views_have_global_then_local_sizes_and_repeat_per_seed() -> None:
    data = _dino_data()
    views = joint_embedding_views(data)
    assert [v.size for v in views] == [32, 32, 16, 16, 16]
    assert [v.color.blur_prob for v in views] == [1.0, 0.1, 0.5, 0.5, 0.5]
    assert [v.color.solarize_prob for v in views] == [0.0, 0.2, 0.0, 0.0, 0.0]
    transform = MultiView(views, data.hflip, data.mean, data.std)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    first = transform(image, torch.Generator().manual_seed(5))
    again = transform(image, torch.Generator().manual_seed(5))
    other = transform(image, torch.Generator().manual_seed(6))
    assert [tuple(v.shape) for v in first] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert not torch.equal(first[0], first[1])  # the two global views differ


def test_device_color_normalizes_views_and_checks_their_number() -> None:
    data = _dino_data(local_crops=0)
    views = joint_embedding_views(data)
    geometry_only = MultiView(views, data.hflip, data.mean, data.std, color_in_workers=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    raw = geometry_only(image, torch.Generator().manual_seed(0))
    assert all(0 <= float(v.min()) and float(v.max()) <= 1 for v in raw)  # not yet normalized
    batch = {"image": [v.unsqueeze(0) for v in raw]}
    out = DeviceColor(views, data.mean, data.std)(batch)
    assert [tuple(v.shape) for v in out["image"]] == [(1, 3, 32, 32)] * 2
    assert float(out["image"][0].min()) < 0  # normalized
    with pytest.raises(ValueError, match="expected 2 views"):
        DeviceColor(views, data.mean, data.std)({"image": batch["image"][:1]})
