"""Write samples into WebDataset tar shards, one series per split, and the directory's manifest."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from webdataset import TarWriter

from data_pipeline.manifest import MANIFEST_NAME, SHARD_NAME, Manifest, ShardInfo, file_sha256
from data_pipeline.size_cap import cap_encoded
from data_pipeline.sources import Sample

IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG"}
_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


class SplitWriter:
    """The open shard of one split; each finished shard appears under its final name in one rename."""

    def __init__(self, out_dir: Path, split: str, shard_size: int) -> None:
        self.out_dir, self.split, self.shard_size = out_dir, split, shard_size
        self.shards: list[ShardInfo] = []
        self._file: BinaryIO | None = None
        self._tar: TarWriter | None = None
        self._count = 0

    @property
    def _tmp_path(self) -> Path:
        return self.out_dir / f".{shard_name(self.split, len(self.shards))}.tmp"

    def write(self, record: dict[str, str | bytes]) -> None:
        if self._tar is None:
            self._file = open(self._tmp_path, "wb")
            # A fixed mtime makes shards (and checksums) reproducible byte for byte; an int, because a
            # float mtime adds a PAX header to every member (+50% size, ~2.5x slower tar parsing).
            self._tar = TarWriter(self._file, encoder=False, mtime=0)
        self._tar.write(record)
        self._count += 1
        if self._count == self.shard_size:
            self.finish()

    def finish(self) -> None:
        if self._tar is None or self._file is None:
            return
        self._tar.close()
        self._file.close()
        name = shard_name(self.split, len(self.shards))
        tmp = self._tmp_path
        self.shards.append(ShardInfo(name, self._count, file_sha256(tmp), tmp.stat().st_size))
        os.replace(tmp, self.out_dir / name)
        self._tar, self._file, self._count = None, None, 0

    def abort(self) -> None:
        """Remove everything this writer wrote, so a failed run leaves no partial dataset."""
        if self._tar is not None and self._file is not None:
            self._tar.close()
            self._file.close()
            self._tmp_path.unlink(missing_ok=True)
        for shard in self.shards:
            (self.out_dir / shard.name).unlink(missing_ok=True)


def encode_image(sample: Sample, image_format: str) -> tuple[str, bytes]:
    """(extension, bytes): a sample's original file when it has one, else its image encoded."""
    if sample.data is not None and sample.ext is not None:
        return sample.ext, sample.data
    _check_image_format(image_format)
    assert sample.image is not None
    buf = io.BytesIO()
    options = {"quality": 95} if image_format == "jpg" else {}
    sample.image.convert("RGB").save(buf, format=IMAGE_FORMATS[image_format], **options)
    return image_format, buf.getvalue()


def write_shards(
    samples: Iterable[Sample],
    out_dir: str | os.PathLike[str],
    shard_size: int = 1000,
    image_format: str = "png",
    *,
    classes: Sequence[str] | None = None,
    source: str = "",
    image_size: int | None = None,
    overwrite: bool = False,
    max_side: int | None = None,
) -> Manifest:
    """Write `{split}-{index:06d}.tar` shards with `{key}.{png|jpg}`, `{key}.cls` and `{key}.json` members.

    `classes` names the labels (default: the label numbers). An existing manifest or shards in
    `out_dir` are an error unless `overwrite`, so two datasets never mix in one directory.
    `max_side`: re-encode images whose long side is larger to that size (`size_cap.py`).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    _check_image_format(image_format)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clear_previous_shards(out, overwrite)

    writers: dict[str, SplitWriter] = {}
    seen: set[str] = set()
    max_label = -1
    resized = 0
    try:
        for sample in samples:
            _check_sample(sample, seen, classes)
            max_label = max(max_label, sample.label)
            ext, data = encode_image(sample, image_format)
            if max_side is not None:
                ext, data, was_resized = cap_encoded(ext, data, max_side)
                resized += was_resized
            class_name = classes[sample.label] if classes is not None else str(sample.label)
            meta = {"key": sample.key, "label": sample.label, "class": class_name, "split": sample.split}
            meta["source"] = sample.origin or source
            if sample.split not in writers:
                writers[sample.split] = SplitWriter(out, sample.split, shard_size)
            writers[sample.split].write(
                {"__key__": sample.key, ext: data, "cls": str(sample.label).encode(), "json": json.dumps(meta).encode()}
            )
        for writer in writers.values():
            writer.finish()
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    if not writers:
        raise ValueError(f"write_shards({out}): the sample iterator was empty")

    manifest = Manifest(
        root=out,
        source=source,
        classes=list(classes) if classes is not None else [str(i) for i in range(max_label + 1)],
        image_size=image_size,
        splits={split: writer.shards for split, writer in sorted(writers.items())},
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        size_cap={"max_side": max_side, "resized": resized} if max_side is not None else None,
    )
    manifest.save()
    return manifest


def _check_image_format(image_format: str) -> None:
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")


def _check_sample(sample: Sample, seen: set[str], classes: Sequence[str] | None) -> None:
    if not _KEY_PATTERN.fullmatch(sample.key):
        raise ValueError(f"sample key {sample.key!r}: use only letters, digits, '_' and '-'")
    if sample.key in seen:
        raise ValueError(f"sample key {sample.key!r} occurs twice")
    seen.add(sample.key)
    if not _KEY_PATTERN.fullmatch(sample.split) or "-" in sample.split:
        raise ValueError(f"sample {sample.key!r}: split name {sample.split!r} must be letters, digits and '_'")
    if sample.label < 0 or (classes is not None and sample.label >= len(classes)):
        bound = f"[0, {len(classes)})" if classes is not None else "[0, inf)"
        raise ValueError(f"sample {sample.key!r}: label {sample.label} is outside {bound}")


def clear_previous_shards(out: Path, overwrite: bool) -> None:
    previous = [p for p in out.iterdir() if p.name == MANIFEST_NAME or SHARD_NAME.fullmatch(p.name)]
    if previous and not overwrite:
        raise FileExistsError(f"{out} already holds shards or a manifest ({previous[0].name}); pass overwrite=True")
    for path in previous:
        path.unlink()
