"""Decode a raw WebDataset record (member bytes by extension) into an RGB image (or a latent array) and a label."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
LATENT_EXTENSION = "npy"  # latent shards (`pretrain data latents`): a float array per sample


class DecodeError(ValueError):
    """A sample that cannot be used; the reader skips it and names `key`."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"sample {key!r}: {reason}")
        self.key = key
        self.reason = reason


def decode_image(data: bytes, key: str) -> Image.Image:
    """RGB image from encoded bytes, fully loaded so a truncated file fails here, not later."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except Exception as exc:  # PIL's decoders raise many types (OSError, SyntaxError, struct.error, ...)
        raise DecodeError(key, f"undecodable image ({type(exc).__name__}: {exc})") from exc


def decode_label(data: bytes, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(key, f"label {data[:20]!r} is not an integer") from exc


def decode_latent(data: bytes, key: str) -> torch.Tensor:
    """A float tensor from `.npy` bytes (no pickled objects)."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError for bad bytes
        raise DecodeError(key, f"undecodable latent ({type(exc).__name__}: {exc})") from exc
    if array.dtype.kind != "f":
        raise DecodeError(key, f"latent dtype {array.dtype} is not floating point")
    return torch.from_numpy(array.copy())


def decode_record(record: Mapping[str, object]) -> tuple[Image.Image | torch.Tensor, int]:
    """(image, label) from a record with one image member and a `.cls` member; a `.npy` latent member
    takes the image's place in latent shards."""
    key = str(record.get("__key__", "?"))
    if LATENT_EXTENSION in record and "cls" in record:
        latent_data, label_data = record[LATENT_EXTENSION], record["cls"]
        assert isinstance(latent_data, bytes) and isinstance(label_data, bytes)
        return decode_latent(latent_data, key), decode_label(label_data, key)
    ext = next((e for e in IMAGE_EXTENSIONS if e in record), None)
    if ext is None:
        raise DecodeError(key, f"no image member (looked for {', '.join(IMAGE_EXTENSIONS)})")
    if "cls" not in record:
        raise DecodeError(key, "no .cls label member")
    image_data, label_data = record[ext], record["cls"]
    assert isinstance(image_data, bytes) and isinstance(label_data, bytes)
    return decode_image(image_data, key), decode_label(label_data, key)
