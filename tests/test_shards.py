"""Sources, shard writing, manifests, shard-spec resolution and the `shards` command."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_pipeline.cli import main as cli_main
from data_pipeline.manifest import Manifest, file_sha256
from data_pipeline.shard_writer import write_shards
from data_pipeline.shardlist import resolve_shards
from data_pipeline.sources import (
    DIGITS_CLASSES,
    Sample,
    digits_samples,
    folder_classes,
    folder_samples,
    synthetic_classes,
    synthetic_samples,
)


def _write_synthetic(
    out: Path, num: int = 50, shard_size: int = 8, test_fraction: float = 0.2, overwrite: bool = False
) -> Manifest:
    samples = synthetic_samples(num, 16, num_classes=5, seed=1, test_fraction=test_fraction)
    classes = synthetic_classes(5)
    return write_shards(
        samples, out, shard_size, classes=classes, source="synthetic test", image_size=16, overwrite=overwrite
    )


def _tar_members(path: Path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def test_manifest_records_shards_with_checksums(tmp_path):
    manifest = _write_synthetic(tmp_path)
    raw = json.loads((tmp_path / "manifest.json").read_text())
    assert raw["format_version"] == 1 and raw["source"] == "synthetic test" and raw["image_size"] == 16
    assert raw["classes"] == synthetic_classes(5) and raw["created"]
    assert raw["splits"]["train"]["num_samples"] == 40 and raw["splits"]["test"]["num_samples"] == 10
    assert [s["name"] for s in raw["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(5)]
    assert [s["num_samples"] for s in raw["splits"]["test"]["shards"]] == [8, 2]
    assert raw["totals"] == {
        "num_shards": 7,
        "num_samples": 50,
        "bytes": sum(p.stat().st_size for p in tmp_path.glob("*.tar")),
    }
    for split in raw["splits"].values():
        for shard in split["shards"]:
            assert file_sha256(tmp_path / shard["name"]) == shard["sha256"]
            assert (tmp_path / shard["name"]).stat().st_size == shard["bytes"]
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind
    loaded = Manifest.load(tmp_path / "manifest.json")
    assert loaded.splits == manifest.splits and loaded.shard_paths("test") == manifest.shard_paths("test")


def test_verify_reports_modified_and_missing_shards(tmp_path):
    manifest = _write_synthetic(tmp_path)
    assert manifest.verify() == []
    modified, missing = tmp_path / "train-000001.tar", tmp_path / "test-000000.tar"
    data = bytearray(modified.read_bytes())
    data[700] ^= 0xFF  # same size, different content
    modified.write_bytes(bytes(data))
    missing.unlink()
    assert sorted(Manifest.load(tmp_path).verify()) == sorted([str(modified), str(missing)])


def test_shards_round_trip_keys_labels_images(tmp_path):
    samples = list(synthetic_samples(12, 16, num_classes=4, seed=3))
    write_shards(iter(samples), tmp_path, shard_size=5, classes=synthetic_classes(4), source="rt")
    members = {}
    for path in sorted(tmp_path.glob("train-*.tar")):
        members.update(_tar_members(path))
    assert len(members) == 3 * len(samples)
    for sample in samples:
        decoded = Image.open(io.BytesIO(members[f"{sample.key}.png"]))
        assert np.array_equal(np.asarray(decoded.convert("RGB")), np.asarray(sample.image))
        assert int(members[f"{sample.key}.cls"]) == sample.label
        meta = json.loads(members[f"{sample.key}.json"])
        assert meta["label"] == sample.label and meta["class"] == synthetic_classes(4)[sample.label]
        assert meta["source"].startswith("synthetic(seed=3)")


def test_shards_are_reproducible_and_not_silently_overwritten(tmp_path):
    first = _write_synthetic(tmp_path / "a")
    second = _write_synthetic(tmp_path / "b")
    assert first.splits == second.splits  # fixed member mtimes: identical bytes and checksums
    with pytest.raises(FileExistsError, match="already holds"):
        _write_synthetic(tmp_path / "a")
    smaller = _write_synthetic(tmp_path / "a", num=20, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "a").glob("*.tar")) == sorted(
        Path(p).name for split in smaller.splits for p in smaller.shard_paths(split)
    )


def test_write_shards_rejects_bad_keys_and_labels(tmp_path):
    image = Image.new("RGB", (4, 4))
    with pytest.raises(ValueError, match="'a.b'"):
        write_shards([Sample("a.b", image, 0, "train")], tmp_path / "k")
    with pytest.raises(ValueError, match="occurs twice"):
        write_shards([Sample("a", image, 0, "train"), Sample("a", image, 1, "train")], tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []  # a failed write leaves nothing behind
    with pytest.raises(ValueError, match="label 3"):
        write_shards([Sample("a", image, 3, "train")], tmp_path / "l", classes=["x", "y"])


def test_digits_source_is_the_real_dataset_split_by_class():
    samples = list(digits_samples(16, test_fraction=0.2, seed=0))
    assert len(samples) == 1797
    assert {s.label for s in samples} == set(range(10)) and len(DIGITS_CLASSES) == 10
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert (len(train), len(test)) == (1437, 360)
    for label in range(10):  # stratified: every class is ~20% test
        of_class = [s for s in samples if s.label == label]
        assert abs(sum(s.split == "test" for s in of_class) / len(of_class) - 0.2) < 0.02
    image = samples[0].image
    assert image.size == (16, 16) and image.mode == "RGB" and np.asarray(image).max() > 200
    assert [s.split for s in digits_samples(16, seed=0)] == [s.split for s in samples]


def test_synthetic_source_is_deterministic_and_its_classes_recoverable():
    from sklearn.neighbors import KNeighborsClassifier

    a = list(synthetic_samples(400, 24, num_classes=10, seed=5, test_fraction=0.25))
    b = list(synthetic_samples(400, 24, num_classes=10, seed=5, test_fraction=0.25))
    assert all(np.array_equal(np.asarray(x.image), np.asarray(y.image)) for x, y in zip(a, b))
    assert sum(s.split == "test" for s in a) == 100
    features = np.stack([np.asarray(s.image.resize((8, 8), Image.BILINEAR), dtype=np.float32).ravel() / 255 for s in a])
    labels = np.array([s.label for s in a])
    is_test = np.array([s.split == "test" for s in a])
    clf = KNeighborsClassifier(5).fit(features[~is_test], labels[~is_test])
    assert clf.score(features[is_test], labels[is_test]) > 0.85


def _make_folder(root: Path) -> dict[str, bytes]:
    originals = {}
    for split, classes in {"train": ["cat", "dog"], "val": ["cat", "dog"]}.items():
        for name in classes:
            (root / split / name).mkdir(parents=True)
            for i, fmt in enumerate(["JPEG", "PNG", "BMP"]):
                path = root / split / name / f"img.{i}.{fmt.lower()}"
                Image.new("RGB", (20 + i, 12), (40 * i, 100, 200)).save(path, format=fmt)
                originals[str(path)] = path.read_bytes()
    (root / "train" / "dog" / "notes.txt").write_text("not an image")
    return originals


def test_folder_source_keeps_original_bytes_and_sorted_labels(tmp_path):
    originals = _make_folder(tmp_path / "tree")
    assert folder_classes(tmp_path / "tree") == ["cat", "dog"]
    samples = list(folder_samples(tmp_path / "tree"))
    assert len(samples) == 12 and {s.split for s in samples} == {"train", "val"}
    for s in samples:
        assert s.label == ["cat", "dog"].index(Path(s.origin).parent.name)
        if s.origin.endswith((".jpeg", ".png")):
            assert s.data == originals[s.origin] and s.image is None
        else:
            assert s.data is None and s.image.size == (22, 12)
    manifest = write_shards(iter(samples), tmp_path / "out", shard_size=100, classes=["cat", "dog"])
    members = _tar_members(Path(manifest.shard_paths("val")[0]))
    jpeg = next(s for s in samples if s.split == "val" and s.origin.endswith(".jpeg"))
    assert members[f"{jpeg.key}.jpg"] == originals[jpeg.origin]

    flat = tmp_path / "flat"
    (flat / "b").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(flat / "b" / "x.png")
    assert [(s.split, s.label) for s in folder_samples(flat)] == [("train", 0)]


def test_resolve_shards_for_each_spec_kind(tmp_path):
    manifest = _write_synthetic(tmp_path / "ds")
    train = manifest.shard_paths("train")
    assert resolve_shards(str(tmp_path / "ds" / "manifest.json")) == train
    assert resolve_shards(str(tmp_path / "ds"), split="test") == manifest.shard_paths("test")
    brace = str(tmp_path / "ds" / "train-{000000..000004}.tar")
    assert resolve_shards(brace) == train
    assert resolve_shards(f"{train[0]},{train[3]}") == [train[0], train[3]]
    assert resolve_shards([train[1], train[2]]) == [train[1], train[2]]
    assert resolve_shards(str(tmp_path / "ds" / "train-*.tar")) == train
    assert resolve_shards(f"file://{train[0]}") == [train[0]]
    assert resolve_shards("https://host/d/train-{0..2}.tar,pipe:cat /x.tar") == [
        "https://host/d/train-0.tar",
        "https://host/d/train-1.tar",
        "https://host/d/train-2.tar",
        "pipe:cat /x.tar",
    ]
    # a comma inside braces belongs to the pattern
    assert resolve_shards(str(tmp_path / "ds" / "train-00000{0,2}.tar")) == [train[0], train[2]]
    # missing paths in a list are kept for the reader to skip and count
    assert resolve_shards([train[0], str(tmp_path / "gone.tar")]) == [train[0], str(tmp_path / "gone.tar")]

    plain = tmp_path / "plain"
    plain.mkdir()
    for name in ["b.tar", "a.tar"]:
        (plain / name).write_bytes(b"")
    assert resolve_shards(str(plain)) == [str(plain / "a.tar"), str(plain / "b.tar")]
    named = tmp_path / "named"
    named.mkdir()
    for name in ["train-000000.tar", "test-000000.tar"]:
        (named / name).write_bytes(b"")
    assert resolve_shards(str(named), split="test") == [str(named / "test-000000.tar")]


def test_resolve_shards_errors_name_the_spec(tmp_path):
    (tmp_path / "empty").mkdir()
    for spec in [str(tmp_path / "empty"), str(tmp_path / "nope-{0..3}.tar"), str(tmp_path / "missing.tar")]:
        with pytest.raises(FileNotFoundError, match="matches no shards"):
            resolve_shards(spec)
    with pytest.raises(ValueError, match="empty shard spec"):
        resolve_shards(" , ")
    _write_synthetic(tmp_path / "ds", test_fraction=0.0)
    with pytest.raises(ValueError, match="no split 'val'"):
        resolve_shards(str(tmp_path / "ds"), split="val")


def test_cli_writes_shards_and_prints_a_summary(tmp_path, capsys):
    out = tmp_path / "syn"
    argv = ["shards", "--source", "synthetic", "--out", str(out), "--num", "30", "--image-size", "16"]
    assert cli_main(argv + ["--shard-size", "10", "--test-fraction", "0.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["test: 1 shards, 6 samples", "train: 3 shards, 24 samples", f"manifest: {out / 'manifest.json'}"]
    assert Manifest.load(out).classes == synthetic_classes(10)
    assert cli_main(argv) == 2 and "already holds" in capsys.readouterr().err
    assert cli_main(["shards", "--source", "folder", "--out", str(tmp_path / "f")]) == 2
    assert "--root" in capsys.readouterr().err
