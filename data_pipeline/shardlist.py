"""Turn a shard spec from a config or command line into an ordered list of shard paths/URLs."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from webdataset.shardlists import expand_urls

from data_pipeline.manifest import MANIFEST_NAME, SHARD_NAME, Manifest

_REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")  # http:, https:, pipe:, s3:, gs: ...


def resolve_shards(spec: str | list[str], split: str = "train") -> list[str]:
    """Shards for `split` named by `spec`.

    `spec` is a manifest.json path; a directory (its manifest, else its sorted `*.tar`, narrowed to
    `{split}-*.tar` when all are named that way); a brace pattern (`/d/train-{000000..000009}.tar`); a glob;
    or a comma-separated string or list of any of these, including URLs opened later by
    `webdataset.gopen` (http(s)://, pipe:, ...). Plain paths are kept even if missing, so the reader
    can skip and count them; the spec as a whole must name at least one shard that exists or a URL.
    """
    items = spec if isinstance(spec, list) else _split_commas(spec)
    items = [item.strip() for item in items if item.strip()]
    if not items:
        raise ValueError(f"empty shard spec {spec!r}")
    shards = [shard for item in items for shard in _resolve_item(item, split)]
    if not any(_is_remote(s) or os.path.exists(s) for s in shards):
        detail = f" (none of the {len(shards)} listed files exists)" if shards else ""
        raise FileNotFoundError(f"shard spec {spec!r} matches no shards for split {split!r}{detail}")
    return shards


def shard_sample_counts(spec: str | list[str], split: str = "train") -> dict[str, int]:
    """Samples per shard path, for the shards of `spec` that a manifest describes (the rest are unknown).

    Lets a reader count the samples lost with a shard that fails, not just the failure."""
    items = spec if isinstance(spec, list) else _split_commas(spec)
    counts: dict[str, int] = {}
    for item in (i.strip() for i in items):
        path = Path(url2pathname(urlparse(item).path)) if item.startswith("file:") else Path(item)
        manifest = path / MANIFEST_NAME if path.is_dir() else path
        if manifest.is_file() and manifest.suffix == ".json":
            try:
                counts.update(Manifest.load(manifest).sample_counts(split))
            except (OSError, ValueError):  # not a manifest, or not this split: counts stay unknown
                continue
    return counts


def _resolve_item(item: str, split: str) -> list[str]:
    if item.startswith("file:"):
        item = url2pathname(urlparse(item).path)
    elif _is_remote(item):
        return expand_urls(item)
    path = Path(item)
    if path.is_dir():
        return _directory_shards(path, split)
    if path.is_file() and path.suffix == ".json":
        return Manifest.load(path).shard_paths(split)
    if "{" in item:
        return expand_urls(item)
    if any(c in item for c in "*?["):
        return sorted(glob.glob(item))
    return [item]


def _directory_shards(directory: Path, split: str) -> list[str]:
    if (directory / MANIFEST_NAME).is_file():
        return Manifest.load(directory).shard_paths(split)
    tars = sorted(directory.glob("*.tar"))
    if tars and all(SHARD_NAME.fullmatch(p.name) for p in tars):
        tars = [p for p in tars if p.name.startswith(f"{split}-")]
    return [str(p) for p in tars]


def _is_remote(item: str) -> bool:
    return bool(_REMOTE.match(item))


def _split_commas(spec: str) -> list[str]:
    """Split at commas outside braces, so `{a,b}` alternatives stay one pattern."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts
