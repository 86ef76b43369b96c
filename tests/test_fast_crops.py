"""The fast crop path (data.decode = "fast") against the reference transforms: the same crop boxes and
flips from the same generator, bit-identical pixels where nothing is approximated (PIL resize at full
resolution), within stated tolerances where the DCT-domain reduction or torch's resize applies, and the
same skip-and-count of undecodable images in the reader."""

import io
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipeline import decode as decode_module
from data_pipeline.augment import IMAGENET_MEAN, IMAGENET_STD, RandomResizedCrop, mae_transform
from data_pipeline.decode import DecodeError, EncodedImage, decode_image
from data_pipeline.fast_crops import CropView, DeviceNormalize, FastCrops, draft_factor
from data_pipeline.loader import ResumableLoader
from data_pipeline.photo_like import encode_jpeg, photo_like_image
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import Sample
from data_pipeline.views import ColorAugment, DeviceColor, MultiView, ViewSpec

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [encode_jpeg(photo_like_image(160, 120, rng)) for _ in range(4)]


def _to_uint8(normalized: torch.Tensor) -> torch.Tensor:
    """Undo Normalize and ToTensor (exact to well under half a level)."""
    return (normalized.unsqueeze(0) * STD + MEAN).mul(255).round().squeeze(0).to(torch.uint8)


def test_draft_factor_keeps_the_output_resolution():
    assert draft_factor(224, 300, 224) == 1
    assert draft_factor(448, 500, 224) == 2
    assert draft_factor(447, 900, 224) == 1
    assert draft_factor(800, 900, 96) == 8
    assert draft_factor(400, 390, 96) == 4


def test_crop_boxes_and_flips_are_the_reference_draws():
    fast = FastCrops([CropView(24, (0.08, 1.0)), CropView(12, (0.05, 0.4))], hflip=0.5)
    crops = [RandomResizedCrop(24, (0.08, 1.0)), RandomResizedCrop(12, (0.05, 0.4))]
    for seed in range(200):
        gen = _gen(seed)
        expected = []
        for crop in crops:  # the reference order: crop, then flip, view by view
            box = crop.crop_box(173, 111, gen)
            expected.append((box, float(torch.empty(()).uniform_(0.0, 1.0, generator=gen)) < 0.5))
        assert [(d.box, d.flip) for d in fast.draw(173, 111, _gen(seed))] == expected


@pytest.mark.parametrize("resize", ["pil", "torch"])
def test_full_resolution_output_matches_the_reference(resize):
    """PNG (never reduced): PIL resize gives the reference's pixels exactly; torch's is within 3 levels."""
    data = _png(90, 70)
    reference = mae_transform(32)
    fast = FastCrops([CropView(32, (0.2, 1.0))], single=True, resize=resize)
    normalize = DeviceNormalize()
    for seed in range(20):
        out = fast(EncodedImage(data, "k"), _gen(seed))
        assert out.dtype == torch.uint8 and out.shape == (3, 32, 32)
        expected = reference(decode_image(data, "k"), _gen(seed))
        if resize == "pil":
            assert torch.equal(normalize({"image": out.unsqueeze(0)})["image"][0], expected)
        else:
            diff = (out.int() - _to_uint8(expected).int()).abs()
            assert diff.max() <= 3 and diff.float().mean() < 0.25


def test_jpeg_at_full_resolution_is_exact(jpegs):
    """Crops too small to reduce: the decode is PIL's, pixel for pixel."""
    fast = FastCrops([CropView(64, (0.2, 1.0))], single=True, resize="pil")
    reference = mae_transform(64)
    for seed, data in enumerate(jpegs * 3):
        assert fast.reduction(fast.draw(160, 120, _gen(seed))) == 1
        expected = _to_uint8(reference(decode_image(data, "k"), _gen(seed)))
        assert torch.equal(fast(EncodedImage(data, "k"), _gen(seed)), expected)


def test_dct_reduced_decode_is_within_tolerance_and_unbiased(jpegs):
    """Output 16 px from crops of >= 32 px: decoded at 1/2..1/8 in the DCT domain. Each view stays
    close to the reference's pixels, and the mean over views agrees to a fraction of a level."""
    fast = FastCrops([CropView(16, (0.3, 1.0))], single=True)
    reference = mae_transform(16, scale=(0.3, 1.0))
    factors, diffs, fast_means, ref_means = [], [], [], []
    for seed in range(40):
        data = jpegs[seed % len(jpegs)]
        factors.append(fast.reduction(fast.draw(160, 120, _gen(seed))))
        out = fast(EncodedImage(data, "k"), _gen(seed)).float()
        expected = _to_uint8(reference(decode_image(data, "k"), _gen(seed))).float()
        diffs.append((out - expected).abs().mean().item())
        fast_means.append(out.mean().item())
        ref_means.append(expected.mean().item())
    assert min(factors) >= 2 and max(factors) >= 4
    assert max(diffs) < 6.0  # mean absolute difference per view, in levels of 255
    assert abs(np.mean(fast_means) - np.mean(ref_means)) < 1.0


def test_simplejpeg_and_pil_decode_the_same_pixels(jpegs, monkeypatch):
    if decode_module.simplejpeg is None:
        pytest.skip("simplejpeg is not installed: only the PIL decoder runs")
    for reduce in (1, 2, 4, 8):
        fast, fast_factor = EncodedImage(jpegs[0], "k").decode(reduce)
        with monkeypatch.context() as patch:
            patch.setattr(decode_module, "simplejpeg", None)
            slow, slow_factor = EncodedImage(jpegs[0], "k").decode(reduce)
        assert fast_factor == slow_factor == reduce and np.array_equal(fast, slow)


def test_multi_view_with_color_in_workers_matches_the_reference():
    color = ColorAugment(blur_prob=0.5, solarize_prob=0.3, blur_kernel=5)
    specs = [ViewSpec(16, (0.4, 1.0), color), ViewSpec(8, (0.05, 0.4), color)]
    reference = MultiView(specs, 0.5, IMAGENET_MEAN, IMAGENET_STD, color_in_workers=True)
    fast = FastCrops([CropView(s.size, s.scale, s.color) for s in specs], 0.5, resize="pil")
    data = _png(50, 40, seed=3)
    for seed in range(10):
        expected = reference(decode_image(data, "k"), _gen(seed))
        got = fast(EncodedImage(data, "k"), _gen(seed))
        assert len(got) == 2 and all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_multi_view_with_device_color_matches_the_reference():
    """uint8 views through DeviceColor give what the reference's float views give."""
    color = ColorAugment(blur_kernel=5)
    specs = [ViewSpec(16, (0.4, 1.0), color), ViewSpec(16, (0.4, 1.0), color), ViewSpec(8, (0.05, 0.4), color)]
    reference = MultiView(specs, 0.5, IMAGENET_MEAN, IMAGENET_STD, color_in_workers=False)
    fast = FastCrops([CropView(s.size, s.scale) for s in specs], 0.5, resize="pil")
    device = DeviceColor(specs, IMAGENET_MEAN, IMAGENET_STD)
    data = _png(50, 40, seed=5)
    ref_views = [torch.stack(v) for v in zip(*(reference(decode_image(data, "k"), _gen(s)) for s in range(6)))]
    fast_views = [torch.stack(v) for v in zip(*(fast(EncodedImage(data, "k"), _gen(s)) for s in range(6)))]
    assert all(v.dtype == torch.uint8 for v in fast_views)
    torch.manual_seed(7)
    expected = device({"image": ref_views})["image"]
    torch.manual_seed(7)
    got = device({"image": fast_views})["image"]
    assert all(torch.allclose(g, e, atol=1e-5) for g, e in zip(got, expected))


def test_pil_images_are_accepted_at_full_resolution():
    image = Image.open(io.BytesIO(_png(40, 30))).convert("RGB")
    fast = FastCrops([CropView(16, (0.2, 1.0))], single=True, resize="pil")
    expected = _to_uint8(mae_transform(16)(image, _gen(1)))
    assert torch.equal(fast(image, _gen(1)), expected)


def test_undecodable_bytes_raise_decode_errors(jpegs):
    with pytest.raises(DecodeError):
        EncodedImage(b"not an image at all", "k")
    truncated = EncodedImage(jpegs[0][: len(jpegs[0]) // 2], "k")  # header intact, data cut
    with pytest.raises(DecodeError, match="undecodable"):
        truncated.decode(1)


def test_reader_skips_and_counts_bad_images_on_the_fast_path(tmp_path, jpegs, caplog):
    samples = [Sample(f"img{i}", None, i % 2, "train", data=jpegs[i % 4], ext="jpg") for i in range(8)]
    samples[2] = Sample("img2", None, 0, "train", data=jpegs[0][:300], ext="jpg")
    samples[5] = Sample("img5", None, 1, "train", data=b"\xff\xd8 garbage", ext="jpg")
    manifest = write_shards(samples, tmp_path / "ds", shard_size=4)
    fast = FastCrops([CropView(32, (0.2, 1.0))], single=True)
    loader = ResumableLoader(manifest.shard_paths("train"), batch_size=4, transform=fast, infinite=False)
    with caplog.at_level(logging.WARNING, logger="data_pipeline"):
        batches = list(loader)
    keys = [k for b in batches for k in b["key"]]
    assert sorted(keys) == [f"img{i}" for i in (0, 1, 3, 4, 6, 7)] and loader.skipped_total == 2
    assert all(b["image"].dtype == torch.uint8 for b in batches)
    assert sum("img2" in r.getMessage() or "img5" in r.getMessage() for r in caplog.records) == 2
