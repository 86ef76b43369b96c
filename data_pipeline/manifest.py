"""`manifest.json`: the record of what a shard directory holds, so readers and checks need not list it."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-\d{6}\.tar")  # `{split}-{index:06d}.tar`


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the manifest's directory
    num_samples: int
    sha256: str
    bytes: int


@dataclass
class Manifest:
    """Splits of tar shards in one directory, with checksums, classes and provenance."""

    root: Path  # the directory holding manifest.json and the shards; not stored in the file
    source: str
    classes: list[str]
    image_size: int | None  # None when images keep their original sizes (folder sources)
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    created: str = ""
    format_version: int = FORMAT_VERSION
    # Latent shards only (`pretrain data latents`): channels, size, scale_factor, vae, ... ; None for images.
    latent: dict[str, Any] | None = None
    # Token shards only (`pretrain data tokens`): num_codes, size, tokenizer, ... ; None otherwise.
    tokens: dict[str, Any] | None = None
    # `--max-side`: {"max_side": N, "resized": count}; None when images were stored as given.
    size_cap: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        return self.root / MANIFEST_NAME

    @classmethod
    def load(cls, path_or_dir: str | os.PathLike[str]) -> Manifest:
        path = Path(path_or_dir)
        if path.is_dir():
            path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no manifest at {path}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {version!r} is not the supported {FORMAT_VERSION}")
        try:
            splits = {name: [ShardInfo(**shard) for shard in split["shards"]] for name, split in raw["splits"].items()}
            return cls(
                root=path.parent,
                source=raw["source"],
                classes=list(raw["classes"]),
                image_size=raw["image_size"],
                splits=splits,
                created=raw["created"],
                format_version=version,
                latent=raw.get("latent"),
                tokens=raw.get("tokens"),
                size_cap=raw.get("size_cap"),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: missing or malformed field ({exc})") from exc

    def to_dict(self) -> dict[str, Any]:
        splits = {
            name: {
                "num_shards": len(shards),
                "num_samples": sum(s.num_samples for s in shards),
                "bytes": sum(s.bytes for s in shards),
                "shards": [vars(s) for s in shards],
            }
            for name, shards in self.splits.items()
        }
        out = {
            "format_version": self.format_version,
            "created": self.created,
            "source": self.source,
            "image_size": self.image_size,
            "classes": self.classes,
            "splits": splits,
            "totals": {
                key: sum(split[key] for split in splits.values()) for key in ("num_shards", "num_samples", "bytes")
            },
        }
        if self.latent is not None:
            out["latent"] = self.latent
        if self.tokens is not None:
            out["tokens"] = self.tokens
        if self.size_cap is not None:
            out["size_cap"] = self.size_cap
        return out

    def save(self) -> Path:
        """Write manifest.json atomically, so a reader never sees a half-written one."""
        tmp = self.root / f".{MANIFEST_NAME}.tmp"
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, self.path)
        return self.path

    def num_samples(self, split: str) -> int:
        return sum(s.num_samples for s in self._split(split))

    def shard_paths(self, split: str) -> list[str]:
        return [str(self.root / s.name) for s in self._split(split)]

    def sample_counts(self, split: str) -> dict[str, int]:
        """Shard path -> number of samples, as `shard_paths` names them."""
        return {str(self.root / s.name): s.num_samples for s in self._split(split)}

    def verify(self) -> list[str]:
        """Paths of shards that are missing or whose size or sha256 differs from the manifest."""
        bad = []
        for shards in self.splits.values():
            for shard in shards:
                path = self.root / shard.name
                if not path.is_file() or path.stat().st_size != shard.bytes or file_sha256(path) != shard.sha256:
                    bad.append(str(path))
        return bad

    def _split(self, split: str) -> list[ShardInfo]:
        if split not in self.splits:
            raise ValueError(f"{self.path}: no split {split!r} (has {sorted(self.splits)})")
        return self.splits[split]


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
