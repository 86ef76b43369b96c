"""Procedural photo-like JPEGs of ImageNet size, for measuring decode cost without a real data set.

What matters for decode and resize speed is a JPEG's size in pixels and its entropy (bytes per
pixel): ImageNet's typical training image is 500x375, quality ~90, about 80 KB. These images are a
smooth illumination field, a few soft-edged shapes, a band-limited texture and sensor-like noise,
which gives that entropy; their content means nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFilter

from data_pipeline.sources import Sample


def photo_like_image(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """An RGB image with photo-like statistics (smooth regions, edges, texture, noise)."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    xs, ys = xs / width, ys / height
    base = rng.uniform(40, 200, size=3).astype(np.float32)
    image = np.empty((height, width, 3), np.float32)
    for c in range(3):  # low-frequency illumination: a few random plane waves per channel
        field = np.full((height, width), base[c], np.float32)
        for _ in range(3):
            fx, fy = rng.uniform(-3, 3, size=2)
            field += rng.uniform(10, 35) * np.sin(2 * np.pi * (fx * xs + fy * ys) + rng.uniform(0, 2 * np.pi))
        image[..., c] = field
    for _ in range(int(rng.integers(3, 7))):  # soft-edged objects
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        inside = ((xs - cx) ** 2 + ((ys - cy) * height / width) ** 2) < r**2
        image[inside] = 0.5 * image[inside] + 0.5 * rng.uniform(0, 255, size=3)
    texture = rng.normal(0, 1, size=(height // 2 + 1, width // 2 + 1)).astype(np.float32)
    texture_img = Image.fromarray(np.uint8(np.clip(128 + 40 * texture, 0, 255))).resize((width, height))
    texture_img = texture_img.filter(ImageFilter.GaussianBlur(0.8))
    image += (np.asarray(texture_img, np.float32)[..., None] - 128) * 0.8
    image += rng.normal(0, 7.5, size=image.shape).astype(np.float32)
    return Image.fromarray(np.uint8(np.clip(image, 0, 255)), "RGB")


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def photo_like_samples(
    num: int, width: int = 500, height: int = 375, quality: int = 90, num_classes: int = 10, seed: int = 0
) -> Iterator[Sample]:
    """`num` JPEG-encoded samples (labels cycle through `num_classes`), as shard-writer samples."""
    rng = np.random.default_rng(seed)
    for index in range(num):
        data = encode_jpeg(photo_like_image(width, height, rng), quality)
        yield Sample(f"photo_{index:07d}", None, index % num_classes, "train", data=data, ext="jpg")
