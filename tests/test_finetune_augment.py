"""Fine-tuning augmentations of the MAE recipe (timm semantics, our code): RandAugment ops against numpy,
its level -> argument formulas and magnitude noise, Random Erasing boxes, and batch Mixup / CutMix pixels and
targets against the formulas they should follow."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data_pipeline.augment import _uniform
from data_pipeline.randaugment import (
    IMAGENET_FILL,
    RAND_INCREASING_OPS,
    RandAugment,
    apply_op,
    enhance_factor,
    op_argument,
    posterize_bits,
    rotate_degrees,
    shear_factor,
    solarize_add_amount,
    solarize_threshold,
    translate_fraction,
)
from data_pipeline.random_erasing import RandomErasing
from pretrain.methods.mixup import Mixup, smoothed_one_hot, soft_target_cross_entropy


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pixels(width: int = 16, height: int = 12, seed: int = 0, channels: int = 3) -> np.ndarray:
    shape = (height, width, channels) if channels > 1 else (height, width)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _image(width: int = 16, height: int = 12, seed: int = 0) -> Image.Image:
    return Image.fromarray(_pixels(width, height, seed), mode="RGB")


def _op(img: Image.Image, name: str, arg=None) -> np.ndarray:
    return np.asarray(apply_op(img, name, arg), dtype=np.int64)


# ---------------------------------------------------------------- RandAugment: ops against numpy


def test_pixel_ops_match_numpy():
    a = _pixels(16, 12).astype(np.int64)
    img = Image.fromarray(a.astype(np.uint8), mode="RGB")
    assert np.array_equal(_op(img, "Invert"), 255 - a)
    for bits in range(5):
        keep = 0xFF & ~((1 << (8 - bits)) - 1)
        assert np.array_equal(_op(img, "PosterizeIncreasing", bits), a & keep), bits
    for threshold in (0, 100, 200, 256):
        assert np.array_equal(_op(img, "SolarizeIncreasing", threshold), np.where(a >= threshold, 255 - a, a))
    for amount in (0, 50, 110):
        expected = np.where(a < 128, np.minimum(255, a + amount), a)
        assert np.array_equal(_op(img, "SolarizeAdd", amount), expected), amount
    for factor in (0.1, 0.55, 1.9):  # brightness blends with black: x * factor, clipped (PIL rounds)
        out = _op(img, "BrightnessIncreasing", factor)
        assert np.abs(out - np.clip(a * factor, 0, 255)).max() <= 1, factor
    assert np.array_equal(_op(img, "SharpnessIncreasing", 1.0), a)  # factor 1 is the identity


def test_auto_contrast_and_equalize_match_numpy():
    a = (_pixels(32, 24, seed=3) // 2 + 40).astype(np.int64)  # a narrow range, so autocontrast stretches it
    img = Image.fromarray(a.astype(np.uint8), mode="RGB")
    out = _op(img, "AutoContrast")
    for c in range(3):
        lo, hi = a[..., c].min(), a[..., c].max()
        assert out[..., c].min() == 0 and out[..., c].max() == 255
        assert np.abs(out[..., c] - (a[..., c] - lo) * 255.0 / (hi - lo)).max() < 1
    out = _op(img, "Equalize")
    for c in range(3):  # the TF / PIL equalize: LUT from the cumulative histogram, step = (n - last bin) // 255
        hist = np.bincount(a[..., c].ravel(), minlength=256)
        step = (hist.sum() - hist[np.nonzero(hist)[0][-1]]) // 255
        assert step > 0  # else PIL leaves the image as is
        lut = (step // 2 + np.concatenate([[0], np.cumsum(hist)[:-1]])) // step
        assert np.array_equal(out[..., c], np.minimum(lut, 255)[a[..., c]]), c


def test_translate_moves_pixels_and_fills_with_the_mean_color():
    a = _pixels(16, 12)
    img = Image.fromarray(a, mode="RGB")
    out = _op(img, "TranslateXRel", 0.25)  # 0.25 * 16 = 4 pixels, content moves left
    assert np.array_equal(out[:, :12], a[:, 4:]) and (out[:, 12:] == IMAGENET_FILL).all()
    out = _op(img, "TranslateXRel", -0.25)
    assert np.array_equal(out[:, 4:], a[:, :12]) and (out[:, :4] == IMAGENET_FILL).all()
    out = _op(img, "TranslateYRel", 0.25)  # 0.25 * 12 = 3 pixels up
    assert np.array_equal(out[:9], a[3:]) and (out[9:] == IMAGENET_FILL).all()
    gray = Image.fromarray(_pixels(16, 12, channels=1), mode="L")
    out_gray = apply_op(gray, "TranslateYRel", -0.25)
    luma = round(0.299 * IMAGENET_FILL[0] + 0.587 * IMAGENET_FILL[1] + 0.114 * IMAGENET_FILL[2])
    assert out_gray.mode == "L" and (np.asarray(out_gray)[:3] == luma).all()
    assert np.array_equal(np.asarray(out_gray)[3:], np.asarray(gray)[:9])


def test_rotate_and_shear_match_numpy():
    a = _pixels(16, 16)
    img = Image.fromarray(a, mode="RGB")
    assert np.array_equal(_op(img, "Rotate", 90.0), np.rot90(a))  # PIL: positive degrees = counter-clockwise
    assert np.array_equal(_op(img, "Rotate", -90.0), np.rot90(a, -1))
    fill = np.array(IMAGENET_FILL)
    # factor 2 keeps every sample on a pixel center: out(x, y) = in(x + 2y + 1, y) (centers at +0.5)
    shear_x, shear_y = np.empty_like(a), np.empty_like(a)
    for y in range(16):
        for x in range(16):
            shear_x[y, x] = a[y, x + 2 * y + 1] if x + 2 * y + 1 < 16 else fill
            shear_y[y, x] = a[y + 2 * x + 1, x] if y + 2 * x + 1 < 16 else fill
    assert np.array_equal(_op(img, "ShearX", 2.0), shear_x)
    assert np.array_equal(_op(img, "ShearY", 2.0), shear_y)


def test_ops_keep_mode_and_size_for_rgb_and_gray():
    gray = Image.fromarray(_pixels(16, 12, channels=1), mode="L")
    for img in (_image(), gray):
        for name in RAND_INCREASING_OPS:
            out = apply_op(img, name, op_argument(name, 7.0, _gen(0)))
            assert out.mode == img.mode and out.size == img.size, name
    assert np.array_equal(np.asarray(apply_op(gray, "Invert")), 255 - np.asarray(gray))


# ---------------------------------------------------------------- RandAugment: arguments and sampling


def test_level_to_argument_formulas():
    assert {m: posterize_bits(m) for m in (0, 5, 9, 10)} == {0: 4, 5: 2, 9: 1, 10: 0}
    assert {m: solarize_threshold(m) for m in (0, 5, 9, 10)} == {0: 256, 5: 128, 9: 26, 10: 0}
    assert {m: solarize_add_amount(m) for m in (0, 5, 9, 10)} == {0: 0, 5: 55, 9: 99, 10: 110}
    signed = {
        "Rotate": (lambda m, g: rotate_degrees(m, g), {0: 0.0, 5: 15.0, 9: 27.0, 10: 30.0}),
        "ShearX": (lambda m, g: shear_factor(m, g), {0: 0.0, 5: 0.15, 9: 0.27, 10: 0.3}),
        "TranslateXRel": (lambda m, g: translate_fraction(m, g), {0: 0.0, 5: 0.225, 9: 0.405, 10: 0.45}),
    }
    for name, (fn, expected) in signed.items():
        for m, value in expected.items():
            signs = set()
            for seed in range(40):
                arg = fn(m, _gen(seed))
                assert abs(arg) == pytest.approx(value), (name, m)
                assert op_argument(name, m, _gen(seed)) == arg, name
                signs.add(np.sign(arg))
            if value:
                assert signs == {-1.0, 1.0}, (name, m)  # both directions occur
    assert translate_fraction(10, _gen(0), translate_pct=0.2) in (pytest.approx(0.2), pytest.approx(-0.2))
    factors = {round(enhance_factor(9, _gen(seed)), 9) for seed in range(40)}
    assert factors == {round(1 + 0.81, 9), round(1 - 0.81, 9)}
    assert {enhance_factor(10, _gen(seed)) for seed in range(40)} == {1.9, 0.1}  # 1 - 0.9 is kept >= 0.1
    for name in ("AutoContrast", "Equalize", "Invert"):
        assert op_argument(name, 9, _gen(0)) is None
    with pytest.raises(ValueError, match="unknown RandAugment op"):
        op_argument("Cutout", 9, _gen(0))


def test_magnitude_noise_mean_std_and_clipping():
    gen = _gen(0)
    draws = np.array([RandAugment(magnitude=5.0, magnitude_std=0.5).sample_magnitude(gen) for _ in range(3000)])
    assert abs(draws.mean() - 5.0) < 0.05 and abs(draws.std() - 0.5) < 0.05
    high = RandAugment(magnitude=9.8, magnitude_std=0.5)
    draws = np.array([high.sample_magnitude(gen) for _ in range(1000)])
    assert draws.max() == 10.0 and draws.min() >= 0 and (draws == 10.0).mean() > 0.2
    low = RandAugment(magnitude=0.2, magnitude_std=0.5)
    draws = np.array([low.sample_magnitude(gen) for _ in range(1000)])
    assert draws.min() == 0.0 and draws.max() <= 10 and (draws == 0.0).mean() > 0.2
    capped = RandAugment(magnitude=9.0, magnitude_std=2.0, magnitude_max=9.5)
    assert max(capped.sample_magnitude(gen) for _ in range(500)) == 9.5
    assert {RandAugment(magnitude=7.0, magnitude_std=0.0).sample_magnitude(gen) for _ in range(20)} == {7.0}
    uniform = RandAugment(magnitude=8.0, magnitude_std=float("inf"))
    draws = np.array([uniform.sample_magnitude(gen) for _ in range(2000)])
    assert draws.min() >= 0 and draws.max() <= 8 and abs(draws.mean() - 4.0) < 0.2


def test_op_choice_is_uniform_over_all_fifteen_ops_with_replacement():
    ra, gen = RandAugment(), _gen(0)
    choices = [ra.choose_ops(gen) for _ in range(3000)]
    assert all(len(c) == 2 for c in choices)
    counts = Counter(name for c in choices for name in c)
    assert set(counts) == set(RAND_INCREASING_OPS) and len(RAND_INCREASING_OPS) == 15
    assert all(300 < n < 500 for n in counts.values()), counts  # 400 expected each
    assert sum(a == b for a, b in choices) > 100  # with replacement: the same op twice ~ 1/15 of the time
    assert len(RandAugment(num_layers=3).choose_ops(gen)) == 3


def test_call_is_the_chosen_ops_applied_with_prob_and_sampled_magnitudes():
    ra, img = RandAugment(), _image(20, 20)
    applied = 0
    for seed in range(30):
        gen, expected = _gen(seed), img
        for name in ra.choose_ops(gen):
            if _uniform(0.0, 1.0, gen) < ra.prob:
                applied += 1
                expected = apply_op(expected, name, op_argument(name, ra.sample_magnitude(gen), gen))
        assert ra(img, _gen(seed)).tobytes() == expected.tobytes(), seed
    assert 15 < applied < 45  # 60 chosen, half applied


def test_same_seed_same_output_different_seed_different_output():
    ra, img = RandAugment(), _image(24, 20, seed=5)
    first = ra(img, _gen(7)).tobytes()
    torch.manual_seed(123)  # the global RNG must not matter
    assert ra(img, _gen(7)).tobytes() == first
    outputs = {ra(img, _gen(seed)).tobytes() for seed in range(12)}
    assert len(outputs) >= 8
    gray = Image.fromarray(_pixels(20, 20, channels=1), mode="L")
    assert all(ra(gray, _gen(seed)).mode == "L" for seed in range(10))


def test_prob_zero_or_no_layers_leaves_the_image_unchanged():
    img = _image(seed=2)
    for ra in (RandAugment(prob=0.0), RandAugment(num_layers=0)):
        assert all(ra(img, _gen(seed)).tobytes() == img.tobytes() for seed in range(30))


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_layers=-1),
        dict(num_layers=1.5),
        dict(magnitude=-1.0),
        dict(magnitude=float("nan")),
        dict(magnitude_std=-0.5),
        dict(magnitude_max=0.0),
        dict(prob=1.5),
        dict(fill=(1, 2)),
        dict(fill=(0, 0, 256)),
        dict(interpolation=Image.Resampling.LANCZOS),
        dict(translate_pct=-0.1),
    ],
)
def test_randaugment_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="RandAugment"):
        RandAugment(**kwargs)


def test_randaugment_rejects_other_image_modes():
    with pytest.raises(ValueError, match="RGB or L"):
        RandAugment()(Image.new("RGBA", (8, 8)), _gen(0))


# ---------------------------------------------------------------- Random Erasing


def _erased_box(before: torch.Tensor, after: torch.Tensor) -> tuple[int, int, int, int] | None:
    """(top, left, h, w) of the changed pixels, asserting they form one filled rectangle."""
    changed = (before != after).any(0)
    if not changed.any():
        return None
    rows, cols = changed.any(1).nonzero().squeeze(1), changed.any(0).nonzero().squeeze(1)
    top, left, h, w = int(rows[0]), int(cols[0]), int(rows[-1] - rows[0] + 1), int(cols[-1] - cols[0] + 1)
    assert int(changed.sum()) == h * w, "changed pixels are not one rectangle"
    assert (before != after)[:, top : top + h, left : left + w].all()  # every channel replaced
    return top, left, h, w


def test_erasing_changes_one_rectangle_within_scale_and_ratio():
    height, width, scale, ratio = 24, 32, (0.02, 1 / 3), (0.3, 1 / 0.3)
    erase, x = RandomErasing(prob=1.0, scale=scale, ratio=ratio), torch.full((3, height, width), 5.0)
    fractions, aspects = [], []
    for seed in range(300):
        box = _erased_box(x, erase(x, _gen(seed)))
        if box is None:  # all 10 tries too big: allowed, but rare
            continue
        _, _, h, w = box
        assert h < height and w < width
        # some (area, aspect) in range rounds to (h, w): bounds loosened by the half-pixel rounding
        assert (h - 0.5) * (w - 0.5) <= scale[1] * height * width and (h + 0.5) * (w + 0.5) >= scale[0] * height * width
        assert (h - 0.5) / (w + 0.5) <= ratio[1] and (h + 0.5) / (w - 0.5) >= ratio[0]
        fractions.append(h * w / (height * width))
        aspects.append(h / w)
    assert len(fractions) > 280
    assert min(fractions) < 0.05 and max(fractions) > 0.25  # the whole scale range is used
    assert min(aspects) < 0.5 and max(aspects) > 2.0  # tall and wide boxes both


def test_erasing_rate_prob_zero_and_input_untouched():
    x = torch.randn(3, 16, 16, generator=_gen(0))
    before = x.clone()
    erased = sum(_erased_box(x, RandomErasing(prob=0.25)(x, _gen(seed))) is not None for seed in range(400))
    assert 70 < erased < 130  # 100 expected
    assert torch.equal(x, before)  # never mutated
    never = RandomErasing(prob=0.0)
    for seed in range(50):
        out = never(x, _gen(seed))
        assert torch.equal(out, x) and out is not x


def test_erasing_modes_fill_values():
    x = torch.full((3, 20, 20), 5.0)
    for seed in range(20):
        out = RandomErasing(prob=1.0, mode="const")(x, _gen(seed))
        top, left, h, w = _erased_box(x, out)
        assert (out[:, top : top + h, left : left + w] == 0).all()
        out = RandomErasing(prob=1.0, mode="rand")(x, _gen(seed))
        top, left, h, w = _erased_box(x, out)
        patch = out[:, top : top + h, left : left + w]
        assert (patch == patch[:, :1, :1]).all() and len(set(patch[:, 0, 0].tolist())) == 3  # one color per channel
    noise = torch.cat([RandomErasing(prob=1.0, mode="pixel")(x, _gen(s)).flatten() for s in range(50)])
    noise = noise[noise != 5.0]
    assert noise.numel() > 5000 and abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # standard normal


def test_erasing_determinism_device_dtype_and_count():
    erase, x = RandomErasing(prob=1.0), torch.zeros(3, 16, 16, dtype=torch.float64)
    first = erase(x, _gen(3))
    assert first.dtype == torch.float64 and torch.equal(first, erase(x, _gen(3)))
    assert not torch.equal(first, erase(x, _gen(4)))
    multi = RandomErasing(prob=1.0, count=3, scale=(0.02, 0.1))
    areas = [int((multi(torch.full((1, 32, 32), 5.0), _gen(s)) != 5.0).sum()) for s in range(50)]
    assert min(areas) > 0 and max(areas) <= 0.1 * 1024 + 40  # per-box area is scale / count; up to 3 boxes


@pytest.mark.parametrize(
    "kwargs",
    [dict(prob=-0.1), dict(scale=(0.5, 0.2)), dict(scale=(0.0, 0.3)), dict(ratio=(2.0, 1.0)), dict(mode="zero")]
    + [dict(count=0)],
)
def test_erasing_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="RandomErasing"):
        RandomErasing(**kwargs)
    with pytest.raises(ValueError, match="RandomErasing"):
        RandomErasing()(torch.zeros(2, 3, 8, 8), _gen(0))


# ---------------------------------------------------------------- Mixup / CutMix


def _batch(size: int = 4, height: int = 8, width: int = 10, seed: int = 0) -> dict:
    return {
        "image": torch.randn(size, 3, height, width, generator=_gen(seed), dtype=torch.float64),
        "label": torch.arange(size) % 5,
        "index": torch.arange(size),
    }


def _smooth(labels: torch.Tensor, classes: int, s: float) -> torch.Tensor:
    out = torch.full((len(labels), classes), s / classes)
    out[torch.arange(len(labels)), labels] = 1 - s + s / classes
    return out


def _targets(labels: torch.Tensor, lam: float, classes: int = 5, s: float = 0.1) -> torch.Tensor:
    return lam * _smooth(labels, classes, s) + (1 - lam) * _smooth(labels.flip(0), classes, s)


def test_mixup_pixels_and_targets_follow_lam():
    mix = Mixup(num_classes=5, cutmix_alpha=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        lams = []
        for seed in range(20):
            batch = _batch(seed=seed)
            x, flipped = batch["image"], batch["image"].flip(0)
            out = mix(batch)
            lam = float(((out["image"] - flipped) * (x - flipped)).sum() / ((x - flipped) ** 2).sum())
            assert torch.allclose(out["image"], lam * x + (1 - lam) * flipped, atol=1e-10)
            assert torch.allclose(out["target"], _targets(batch["label"], lam), atol=1e-6)
            assert torch.allclose(out["target"].sum(1), torch.ones(4))
            assert torch.equal(out["index"], batch["index"]) and "target" not in batch
            lams.append(lam)
    assert 0 < min(lams) and max(lams) < 1 and np.std(lams) > 0.1  # lam ~ Beta(0.8, 0.8)


def test_cutmix_box_comes_from_the_reversed_batch_and_lam_is_its_area():
    mix = Mixup(num_classes=5, mixup_alpha=0.0, cutmix_alpha=1.0)
    height, width = 16, 20
    with torch.random.fork_rng():
        torch.manual_seed(1)
        lams = []
        for seed in range(30):
            batch = _batch(height=height, width=width, seed=seed)
            x, out = batch["image"], mix(batch)
            original = (out["image"] == x).all(0).all(0)
            pasted = (out["image"] == x.flip(0)).all(0).all(0)
            assert (original ^ pasted).all()  # every pixel from exactly one of them
            lam = 1 - int(pasted.sum()) / (height * width)
            if pasted.any():
                rows, cols = pasted.any(1).nonzero().squeeze(1), pasted.any(0).nonzero().squeeze(1)
                assert (
                    int(pasted.sum())
                    == len(rows) * len(cols)
                    == int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))
                )
            assert torch.allclose(out["target"], _targets(batch["label"], lam), atol=1e-6)
            lams.append(lam)
    assert min(lams) < 0.5 < max(lams) <= 1


def test_switch_prob_and_prob_set_the_rates():
    def cutmix_rate(mix: Mixup, calls: int) -> float:
        """Share of calls whose every pixel comes from x or x.flip(0): CutMix (an empty box included); Mixup
        (lam < 1) always blends."""
        cut = 0
        for seed in range(calls):
            batch = {"image": torch.randn(2, 1, 16, 16, generator=_gen(seed)), "label": torch.tensor([0, 1])}
            x, out = batch["image"], mix(batch)["image"]
            cut += bool(((out == x) | (out == x.flip(0))).all())
        return cut / calls

    with torch.random.fork_rng():
        torch.manual_seed(2)
        assert 0.24 < cutmix_rate(Mixup(num_classes=2, switch_prob=0.3), 500) < 0.36  # 0.3 expected
        assert cutmix_rate(Mixup(num_classes=2, switch_prob=0.0), 100) == 0.0
        assert cutmix_rate(Mixup(num_classes=2, switch_prob=1.0), 100) == 1.0
        params = [Mixup(num_classes=2, prob=0.4).sample_params() for _ in range(2000)]
        assert 0.36 < np.mean([lam < 1 for lam, _ in params]) < 0.44
        assert all(not cut for lam, cut in params if lam == 1.0)


def test_prob_zero_gives_smoothed_one_hot_and_unchanged_pixels():
    batch = _batch()
    for mix in (Mixup(num_classes=5, prob=0.0), Mixup(num_classes=5)):
        if mix.prob:
            mix.enabled = False
        for _ in range(10):
            out = mix(batch)
            assert torch.equal(out["image"], batch["image"])
            assert torch.allclose(out["target"], _smooth(batch["label"], 5, 0.1))


def test_mixup_leaves_input_alone_and_is_deterministic_per_global_seed():
    batch = _batch()
    before = batch["image"].clone()
    outs = []
    for _ in range(2):
        with torch.random.fork_rng():
            torch.manual_seed(5)
            outs.append(Mixup(num_classes=5)(batch))
    assert torch.equal(batch["image"], before)
    assert torch.equal(outs[0]["image"], outs[1]["image"]) and torch.equal(outs[0]["target"], outs[1]["target"])


def test_mixup_rejects_odd_batches_and_bad_arguments():
    batch = _batch(size=3)
    with pytest.raises(ValueError, match="even batch"):
        Mixup(num_classes=5)(batch)
    for kwargs in (
        dict(num_classes=0),
        dict(num_classes=5, mixup_alpha=0.0, cutmix_alpha=0.0),
        dict(num_classes=5, prob=1.5),
        dict(num_classes=5, switch_prob=-0.1),
        dict(num_classes=5, label_smoothing=1.0),
    ):
        with pytest.raises(ValueError, match="Mixup"):
            Mixup(**kwargs)


def test_soft_target_cross_entropy_matches_cross_entropy():
    logits = torch.randn(6, 5, generator=_gen(0), dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    hard = smoothed_one_hot(labels, 5, 0.0).double()
    assert torch.equal(hard, F.one_hot(labels, 5).double())
    assert torch.allclose(soft_target_cross_entropy(logits, hard), F.cross_entropy(logits, labels))
    soft = smoothed_one_hot(labels, 5, 0.1).double()
    assert torch.allclose(soft.sum(1), torch.ones(6, dtype=torch.float64))
    assert soft.max() == pytest.approx(0.92) and soft.min() == pytest.approx(0.02)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert torch.allclose(soft_target_cross_entropy(logits, soft), expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_mixup_on_cuda_matches_cpu():
    batch = _batch(seed=4)
    cuda_batch = {k: v.cuda() for k, v in batch.items()}
    for mix in (Mixup(num_classes=5, cutmix_alpha=0.0), Mixup(num_classes=5, mixup_alpha=0.0)):
        with torch.random.fork_rng():
            torch.manual_seed(9)
            cpu = mix(batch)
            torch.manual_seed(9)
            gpu = mix(cuda_batch)
        assert gpu["image"].is_cuda and gpu["target"].is_cuda
        assert torch.allclose(gpu["image"].cpu(), cpu["image"]) and torch.allclose(gpu["target"].cpu(), cpu["target"])
