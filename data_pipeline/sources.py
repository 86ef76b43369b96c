"""Labeled image sources that feed the shard writer: sklearn digits, procedural shapes, image folders.

Every source is an iterator of `Sample`s. A sample carries either a decoded PIL image (sources that
render pixels) or the original encoded file bytes (folders), so JPEGs are never re-encoded on the
way into a shard.
"""

from __future__ import annotations

import colorsys
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

log = logging.getLogger("data_pipeline")

# Encoded formats stored in shards as they are; other readable formats are re-encoded.
PASSTHROUGH_EXTENSIONS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
FOLDER_IMAGE_EXTENSIONS = frozenset(PASSTHROUGH_EXTENSIONS) | {".bmp", ".ppm", ".gif", ".tif", ".tiff"}
DIGITS_CLASSES = tuple(str(d) for d in range(10))
SYNTHETIC_SHAPES = ("disk", "square", "triangle", "cross", "bar")
_FOLDER_SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Sample:
    """One labeled image: `image` (RGB) or the original file as `data` + `ext`, never both."""

    key: str
    image: Image.Image | None
    label: int
    split: str
    data: bytes | None = None
    ext: str | None = None
    origin: str = ""  # where it came from, recorded in the shard's per-sample JSON

    def __post_init__(self) -> None:
        if (self.image is None) == (self.data is None):
            raise ValueError(f"sample {self.key!r}: give exactly one of image or data")
        if self.data is not None and not self.ext:
            raise ValueError(f"sample {self.key!r}: encoded data needs its ext")


def digits_samples(image_size: int, test_fraction: float = 0.2, seed: int = 0) -> Iterator[Sample]:
    """The 1,797 real 8x8 handwritten digits of scikit-learn, upsampled; a stratified train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    test_indices: set[int] = set()
    if test_fraction > 0:
        _, test = train_test_split(indices, test_size=test_fraction, stratify=digits.target, random_state=seed)
        test_indices = set(test.tolist())
    for i in indices.tolist():
        pixels = np.clip(digits.images[i] * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
        gray = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC)
        yield Sample(
            key=f"digits-{i:05d}",
            image=gray.convert("RGB"),
            label=int(digits.target[i]),
            split="test" if i in test_indices else "train",
            origin=f"sklearn.datasets.load_digits[{i}]",
        )


def synthetic_classes(num_classes: int) -> list[str]:
    """Class names of `synthetic_samples`: a shape and a hue, both of which the image shows."""
    shapes = SYNTHETIC_SHAPES
    return [f"{shapes[c % len(shapes)]}-hue{round(360 * c / num_classes):03d}" for c in range(num_classes)]


def synthetic_samples(
    num: int, image_size: int, num_classes: int = 10, seed: int = 0, test_fraction: float = 0.0
) -> Iterator[Sample]:
    """Procedural images whose class (shape + hue) survives random placement, size, rotation and noise.

    Sample i depends only on (seed, i), so any prefix of the stream is reproducible on its own.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    order = np.random.default_rng([seed, num]).permutation(num)
    test = set(order[: round(num * test_fraction)].tolist())
    for i in range(num):
        label = i % num_classes
        rng = np.random.default_rng([seed, i])
        yield Sample(
            key=f"synthetic-{i:07d}",
            image=_render_shape(label, num_classes, image_size, rng),
            label=label,
            split="test" if i in test else "train",
            origin=f"synthetic(seed={seed})[{i}]",
        )


def _render_shape(label: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    background = int(rng.uniform(0, 90))
    canvas = Image.new("RGB", (size, size), (background,) * 3)
    hue = (label / num_classes + rng.uniform(-0.2, 0.2) / num_classes) % 1.0
    r, g, b = colorsys.hsv_to_rgb(hue, rng.uniform(0.75, 1.0), rng.uniform(0.8, 1.0))
    color = (int(255 * r), int(255 * g), int(255 * b))
    radius = size * rng.uniform(0.22, 0.36)
    cx, cy = (size / 2 + rng.uniform(-0.12, 0.12) * size for _ in range(2))
    angle = rng.uniform(-0.35, 0.35)
    draw = ImageDraw.Draw(canvas)
    shape = SYNTHETIC_SHAPES[label % len(SYNTHETIC_SHAPES)]
    if shape == "disk":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    else:
        for polygon in _shape_polygons(shape, radius):
            draw.polygon([_rotate(x, y, angle, cx, cy) for x, y in polygon], fill=color)
    noise = rng.normal(0.0, 8.0, size=(size, size, 3))
    pixels = np.clip(np.asarray(canvas, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def _shape_polygons(shape: str, r: float) -> list[list[tuple[float, float]]]:
    if shape == "square":
        s = r * 0.85
        return [[(-s, -s), (s, -s), (s, s), (-s, s)]]
    if shape == "triangle":
        return [[(r * math.cos(a), r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]]
    w = r * 0.3
    if shape == "cross":
        return [[(-r, -w), (r, -w), (r, w), (-r, w)], [(-w, -r), (w, -r), (w, r), (-w, r)]]
    if shape == "bar":
        return [[(-r, -w), (r, -w), (r, w), (-r, w)]]
    raise ValueError(f"unknown synthetic shape {shape!r}")


def _rotate(x: float, y: float, angle: float, cx: float, cy: float) -> tuple[float, float]:
    c, s = math.cos(angle), math.sin(angle)
    return cx + c * x - s * y, cy + s * x + c * y


def folder_splits(root: str | Path) -> dict[str, Path]:
    """Split name -> directory: root/{train,val,test} when root has a train/ directory, else root itself as train."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if (root / "train").is_dir():
        return {name: root / name for name in _FOLDER_SPLITS if (root / name).is_dir()}
    return {"train": root}


def folder_classes(root: str | Path) -> list[str]:
    """Sorted class-directory names over all splits; a class's label is its index here."""
    names = {d.name for split_dir in folder_splits(root).values() for d in split_dir.iterdir() if d.is_dir()}
    if not names:
        raise FileNotFoundError(f"image folder {root} has no class subdirectories")
    return sorted(names)


def folder_samples(root: str | Path) -> Iterator[Sample]:
    """An ImageNet-style tree root/[split/]<class>/<image>; JPEG/PNG/WebP files keep their original bytes."""
    classes = folder_classes(root)
    label_of = {name: i for i, name in enumerate(classes)}
    for split, split_dir in folder_splits(root).items():
        for class_dir in sorted(d for d in split_dir.iterdir() if d.is_dir()):
            for path in sorted(class_dir.iterdir()):
                suffix = path.suffix.lower()
                if not path.is_file() or suffix not in FOLDER_IMAGE_EXTENSIONS:
                    continue
                key = re.sub(r"[^A-Za-z0-9_-]", "_", f"{split}_{class_dir.name}_{path.stem}")
                common = dict(key=key, label=label_of[class_dir.name], split=split, origin=str(path))
                if suffix in PASSTHROUGH_EXTENSIONS:
                    yield Sample(image=None, data=path.read_bytes(), ext=PASSTHROUGH_EXTENSIONS[suffix], **common)
                else:
                    try:
                        with Image.open(path) as img:
                            image = img.convert("RGB")
                    except (OSError, ValueError) as exc:
                        log.warning("skipping unreadable image %s: %s", path, exc)
                        continue
                    yield Sample(image=image, **common)
