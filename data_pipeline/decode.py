"""Decode a raw WebDataset record (member bytes by extension) into an RGB image (or a latent or token array) and
a label."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
from PIL import Image

try:  # libjpeg-turbo straight into numpy; the fast crop path falls back to PIL without it
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency, but the code does not require it
    simplejpeg = None

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")
# Latent shards (`pretrain data latents`: a float array per sample) and token shards (`pretrain data tokens`:
# an integer array per sample).
LATENT_EXTENSION = "npy"


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


class EncodedImage:
    """An image whose header has been read but whose pixels have not: transforms that know the crop
    before decoding (`data_pipeline.fast_crops`) ask for a DCT-domain reduction of JPEGs.

    JPEGs decode through libjpeg-turbo via simplejpeg when it is installed: the same pixels as PIL
    (same library, same settings; tested), straight into a numpy array, about 20% less time than PIL's
    decode plus the copy out of PIL. Anything simplejpeg rejects (CMYK, other formats) goes through PIL.
    Errors are `DecodeError`s, as in `decode_image`, so bad bytes are skipped and counted.
    """

    def __init__(self, data: bytes, key: str) -> None:
        self.data, self.key = data, key
        self._pil: Image.Image | None = None
        header = _jpeg_header(data)
        if header is not None:
            self.size: tuple[int, int] = header
            return
        try:
            self._pil = Image.open(io.BytesIO(data))
        except Exception as exc:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
            raise DecodeError(key, f"undecodable image ({type(exc).__name__}: {exc})") from exc
        self.size = self._pil.size

    def decode(self, reduce: int = 1) -> tuple[np.ndarray, int]:
        """(uint8 RGB pixels [H, W, 3], factor): a JPEG is scaled by 1/`reduce` (1, 2, 4 or 8) while
        decoding, so pixel (i, j) covers original pixels [i*f, (i+1)*f) x [j*f, (j+1)*f); other
        formats decode at full size (factor 1)."""
        if self._pil is None:
            decoded = _simplejpeg_decode(self.data, self.size, reduce)
            if decoded is not None:
                return decoded
            self._pil = Image.open(io.BytesIO(self.data))  # what simplejpeg rejects (CMYK, ...): PIL's turn
        image, factor = self._pil, 1
        try:
            if reduce > 1 and image.format == "JPEG":
                width, height = self.size
                drafted = image.draft("RGB", (max(1, width // reduce), max(1, height // reduce)))
                if drafted is not None:
                    factor = round(width / drafted[1][2])
            image.load()
            return np.array(image if image.mode == "RGB" else image.convert("RGB")), factor
        except Exception as exc:  # truncated or corrupt data shows up only while decoding
            raise DecodeError(self.key, f"undecodable image ({type(exc).__name__}: {exc})") from exc


def _jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that simplejpeg can read, else None."""
    if simplejpeg is None or data[:2] != b"\xff\xd8":
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:
        return None
    return width, height


def _simplejpeg_decode(data: bytes, size: tuple[int, int], reduce: int) -> tuple[np.ndarray, int] | None:
    """Pixels scaled by exactly 1/reduce (else full size), or None where simplejpeg fails."""
    width, height = size
    try:
        if reduce > 1:
            want = (-(-height // reduce), -(-width // reduce))
            pixels = simplejpeg.decode_jpeg(data, "RGB", min_height=want[0], min_width=want[1])
            if pixels.shape[:2] == want:
                return pixels, reduce
        return simplejpeg.decode_jpeg(data, "RGB"), 1
    except ValueError:  # corrupt, truncated (strict mode), or a colorspace it does not convert
        return None


def decode_label(data: bytes, key: str) -> int:
    try:
        return int(data.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError) as exc:
        raise DecodeError(key, f"label {data[:20]!r} is not an integer") from exc


def decode_latent(data: bytes, key: str) -> torch.Tensor:
    """A float (latents) or integer (tokens) tensor from `.npy` bytes (no pickled objects); the method's
    transform checks which it expects."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as exc:  # numpy raises ValueError, EOFError, OSError for bad bytes
        raise DecodeError(key, f"undecodable latent ({type(exc).__name__}: {exc})") from exc
    if array.dtype.kind not in "fiu":
        raise DecodeError(key, f"array dtype {array.dtype} is neither floating point (latents) nor integer (tokens)")
    if array.dtype.kind == "u":  # torch has no uint16/uint32 arithmetic: widen, the values fit
        array = array.astype(np.int64)
    return torch.from_numpy(array.copy())


def decode_record(
    record: Mapping[str, object], encoded: bool = False
) -> tuple[Image.Image | EncodedImage | torch.Tensor, int]:
    """(image, label) from a record with one image member and a `.cls` member; a `.npy` latent member
    takes the image's place in latent shards. `encoded`: return the image as an `EncodedImage` whose
    pixels the transform decodes."""
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
    label = decode_label(label_data, key)
    return (EncodedImage(image_data, key) if encoded else decode_image(image_data, key)), label
