"""`pretrain data shards --max-side N`: store images no larger than N pixels on their long side.

Decode cost grows with the stored pixels, while training crops are resized to 224 or less: capping the
stored size once, when shards are written, saves that cost on every epoch (as FFCV's `max_resolution`
does). Only larger images are re-encoded (Lanczos downscale, JPEG at quality 95, PNG for everything
else); smaller ones keep their original bytes. The manifest records the cap and how many images it
resized.
"""

from __future__ import annotations

import io

from PIL import Image

JPEG_QUALITY = 95


def capped_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) scaled so the long side is `max_side`, aspect kept; unchanged if already within."""
    long_side = max(width, height)
    if long_side <= max_side:
        return width, height
    scale = max_side / long_side
    return max(1, round(width * scale)), max(1, round(height * scale))


def cap_encoded(ext: str, data: bytes, max_side: int) -> tuple[str, bytes, bool]:
    """(ext, bytes, resized): the image re-encoded at `capped_size` if its long side exceeds `max_side`.

    Bytes PIL cannot read are returned unchanged (the reader skips and counts them at training time).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            target = capped_size(image.width, image.height, max_side)
            if target == image.size:
                return ext, data, False
            if image.format == "JPEG":
                image.draft("RGB", target)  # DCT-domain reduction to no less than the target: faster
            resized = image.convert("RGB").resize(target, Image.Resampling.LANCZOS)
    except Exception:  # PIL raises many types for bad bytes
        return ext, data, False
    buf = io.BytesIO()
    if ext in ("jpg", "jpeg"):
        resized.save(buf, format="JPEG", quality=JPEG_QUALITY)
        return "jpg", buf.getvalue(), True
    resized.save(buf, format="PNG")
    return "png", buf.getvalue(), True
