"""Class-balanced label fractions for semi-supervised fine-tuning (SimCLR's 1 % and 10 % of ImageNet's labels).

Every class keeps the same fraction of its own samples (at least one), so the subset has the split's class
balance. Which samples a class keeps is fixed by a seed and the sample keys alone (each key's rank under a
seeded hash), not by shard order or world size: the same (shards, fraction, seed) give the same subset on any
machine, and a larger fraction of one seed contains the smaller ones.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass

from webdataset.gopen import gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from data_pipeline.decode import DecodeError, decode_label
from data_pipeline.reader import derive_seed
from data_pipeline.shardlist import resolve_shards

log = logging.getLogger("data_pipeline")


@dataclass(frozen=True)
class LabelSubset:
    """The samples kept of a split, and how they were drawn (what a run records)."""

    fraction: float
    seed: int
    keys: frozenset[str]
    per_class: dict[int, int]  # label -> samples kept
    available: int  # labelled samples in the split

    @property
    def digest(self) -> str:
        """sha256 of the sorted keys: one string that says whether two runs trained on the same subset."""
        return hashlib.sha256("\n".join(sorted(self.keys)).encode()).hexdigest()

    def record(self) -> dict:
        return {
            "fraction": self.fraction,
            "seed": self.seed,
            "num_samples": len(self.keys),
            "available": self.available,
            "sha256": self.digest,
            "per_class": {str(label): count for label, count in sorted(self.per_class.items())},
            "keys": sorted(self.keys),
        }


def _is_label_member(fname: str) -> bool:
    _, ext = base_plus_ext(fname)
    return ext == "cls"


def scan_labels(shards: str | list[str], split: str = "train") -> tuple[dict[str, int], int]:
    """(key -> label of every sample with a readable label, shards that failed). Reads only `.cls` members;
    a shard that cannot be read is skipped and counted, like training skips it."""
    labels: dict[str, int] = {}
    failed = 0
    for url in resolve_shards(shards, split):
        try:
            with gopen(url) as stream:
                files = tar_file_expander(
                    [{"url": url, "stream": stream}], handler=reraise_exception, select_files=_is_label_member
                )
                for record in group_by_keys(files, handler=reraise_exception):
                    key = record["__key__"]
                    try:
                        labels[key] = decode_label(record["cls"], key)
                    except DecodeError as exc:
                        log.warning("label scan: skipping sample %r of %s: %s", key, url, exc.reason)
        except Exception as exc:  # unreadable shard: tarfile and openers raise many types
            failed += 1
            log.warning("label scan: skipping shard %s: %s: %s", url, type(exc).__name__, exc)
    return labels, failed


def class_balanced_subset(labels: Mapping[str, int], fraction: float, seed: int) -> LabelSubset:
    """Of each class's n samples keep max(1, round(fraction * n)): those whose keys hash lowest under `seed`."""
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    by_class: dict[int, list[str]] = {}
    for key, label in labels.items():
        by_class.setdefault(label, []).append(key)
    keys: list[str] = []
    per_class: dict[int, int] = {}
    for label, members in by_class.items():
        count = max(1, round(fraction * len(members)))
        members.sort(key=lambda key: (derive_seed(seed, "label-subset", key), key))
        keys.extend(members[:count])
        per_class[label] = count
    return LabelSubset(fraction, seed, frozenset(keys), per_class, len(labels))


def label_subset(shards: str | list[str], split: str, fraction: float, seed: int) -> LabelSubset:
    """The class-balanced `fraction` of a split's labelled samples (see the module docstring)."""
    labels, failed = scan_labels(shards, split)
    if not labels:
        raise ValueError(f"no labelled samples in split {split!r} of {shards!r} ({failed} shards unreadable)")
    subset = class_balanced_subset(labels, fraction, seed)
    log.info(
        "label subset: %d of %d samples (fraction %g, seed %d, %d classes, %d to %d per class)%s",
        len(subset.keys),
        subset.available,
        fraction,
        seed,
        len(subset.per_class),
        min(subset.per_class.values()),
        max(subset.per_class.values()),
        f"; {failed} shards unreadable" if failed else "",
    )
    return subset
