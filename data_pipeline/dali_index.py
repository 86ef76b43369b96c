"""Index files for DALI's `fn.readers.webdataset`, written after checking every shard and sample.

DALI reads a tar shard through an index (per sample: extension, data offset, size and member name of
each component). Writing the index ourselves lets bad data be skipped and counted the way the default
reader does it, because DALI itself stops on an unreadable shard or an undecodable image:

- a shard that cannot be opened or is not a tar is left out (one skip);
- a shard cut short keeps the samples that lie wholly before the cut (one skip for the rest);
- a sample whose image bytes are not a complete JPEG or PNG (header unreadable, end marker missing)
  is left out of the index (one skip). This is a check of the container, not a full decode: an image
  with a valid header and end marker but corrupt entropy-coded data would still stop DALI.

Checking reads every shard once, sequentially, when the loader starts.
"""

from __future__ import annotations

import io
import logging
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from data_pipeline.decode import IMAGE_EXTENSIONS

log = logging.getLogger("data_pipeline")

INDEX_VERSION = "v1.2"
DALI_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")  # what DALI's decoders and our check both cover


@dataclass
class ShardIndex:
    url: str
    samples: list[list[tuple[str, int, int, str]]]  # per sample: (ext, data offset, size, member name)
    bad_samples: list[str] = field(default_factory=list)  # keys left out
    failure: str = ""  # why the shard (or its rest) could not be read; "" if it was read to the end


def image_is_complete(ext: str, data: bytes) -> bool:
    """A readable header and the format's end marker (JPEG EOI, PNG IEND)."""
    if ext in ("jpg", "jpeg"):
        if not (data.startswith(b"\xff\xd8") and data.rstrip(b"\x00").endswith(b"\xff\xd9")):
            return False
    elif ext == "png":
        if b"IEND" not in data[-16:]:
            return False
    else:
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.width > 0 and image.height > 0
    except Exception:  # PIL raises many types for bad headers
        return False


def index_shard(url: str) -> ShardIndex:
    """The usable samples of one tar shard: each with one checked image and a `.cls` member."""
    members: dict[str, list[tuple[str, int, int, str]]] = {}
    order: list[str] = []
    bad: list[str] = []
    failure = ""
    try:
        with tarfile.open(url, "r:") as tar:
            size = Path(url).stat().st_size
            for member in tar:
                if not member.isfile() or "." not in Path(member.name).name:
                    continue
                base, ext = _split(member.name)
                if member.offset_data + member.size > size:
                    raise tarfile.ReadError(f"member {member.name} ends past the end of the file")
                if base not in members:
                    members[base] = []
                    order.append(base)
                if ext in DALI_IMAGE_EXTENSIONS or ext == "cls":
                    reader = tar.extractfile(member)
                    data = reader.read() if reader is not None else b""
                    if not (image_is_complete(ext, data) if ext != "cls" else _is_label(data)):
                        bad.append(base)
                members[base].append((ext, member.offset_data, member.size, member.name))
    except (OSError, tarfile.TarError, EOFError) as exc:
        failure = f"{type(exc).__name__}: {exc}"
    samples = []
    for base in order:
        components = members[base]
        exts = {c[0] for c in components}
        if base in bad:
            continue
        if "cls" not in exts or not exts & set(DALI_IMAGE_EXTENSIONS):
            if exts & set(IMAGE_EXTENSIONS) or "cls" in exts:
                bad.append(base)  # an image without a label, a label without a usable image
            continue
        samples.append(components)
    if failure and samples:  # the sample being read at the cut may be incomplete: drop it
        last = samples.pop()
        bad.append(_split(last[0][3])[0])
    return ShardIndex(url, samples, sorted(set(bad)), failure)


def write_index(index: ShardIndex, path: Path) -> None:
    lines = [f"{INDEX_VERSION} {len(index.samples)}"]
    lines += [" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in s) for s in index.samples]
    path.write_text("\n".join(lines) + "\n")


def build_indexes(urls: Sequence[str], out_dir: Path) -> tuple[list[str], list[str], list[ShardIndex]]:
    """(usable shard paths, their index paths, every shard's index) with bad data logged once each."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths, index_paths, indexes = [], [], []
    for number, url in enumerate(urls):
        index = index_shard(url)
        indexes.append(index)
        if index.failure:
            log.warning("skipping shard %s (rest of it) in the DALI reader: %s", url, index.failure)
        for key in index.bad_samples:
            log.warning("skipping sample %r of shard %s: incomplete or unreadable image", key, url)
        if not index.samples:
            continue
        index_path = out_dir / f"{number:06d}.idx"
        write_index(index, index_path)
        paths.append(url)
        index_paths.append(str(index_path))
    return paths, index_paths, indexes


def _is_label(data: bytes) -> bool:
    try:
        return int(data.decode("ascii").strip()) >= 0
    except (UnicodeDecodeError, ValueError):
        return False


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first dot of the file name."""
    directory, _, filename = name.rpartition("/")
    stem, _, ext = filename.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext
