"""`pretrain data shards --max-side N`: larger images re-encoded to that long side, smaller ones kept
byte for byte, the cap and the count recorded in the manifest."""

import io
import tarfile
from pathlib import Path

from PIL import Image

from data_pipeline.cli import main as cli_main
from data_pipeline.manifest import Manifest
from data_pipeline.size_cap import cap_encoded, capped_size


def _encoded(size: tuple[int, int], fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize(size).save(buf, format=fmt)
    return buf.getvalue()


def test_capped_size_keeps_the_aspect_and_leaves_small_images():
    assert capped_size(500, 375, 256) == (256, 192)
    assert capped_size(375, 500, 256) == (192, 256)
    assert capped_size(200, 100, 256) == (200, 100)
    assert capped_size(10000, 3, 100) == (100, 1)


def test_only_larger_images_are_re_encoded():
    big, small = _encoded((120, 90), "JPEG"), _encoded((40, 30), "PNG")
    ext, data, resized = cap_encoded("jpg", big, 64)
    assert resized and ext == "jpg" and Image.open(io.BytesIO(data)).size == (64, 48)
    assert cap_encoded("png", small, 64) == ("png", small, False)
    ext, data, resized = cap_encoded("png", _encoded((100, 20), "PNG"), 50)
    assert resized and ext == "png" and Image.open(io.BytesIO(data)).size == (50, 10)
    assert cap_encoded("jpg", b"not an image", 64) == ("jpg", b"not an image", False)


def test_cli_caps_a_folder_and_records_it_in_the_manifest(tmp_path, capsys):
    tree = tmp_path / "tree" / "train"
    for name, size in (("a", (160, 120)), ("b", (50, 40))):
        (tree / name).mkdir(parents=True)
        (tree / name / "x.jpg").write_bytes(_encoded(size, "JPEG"))
    out = tmp_path / "out"
    argv = ["shards", "--source", "folder", "--root", str(tmp_path / "tree"), "--out", str(out), "--max-side", "64"]
    assert cli_main(argv) == 0
    assert "size cap: 1 images resized to a long side of 64 px" in capsys.readouterr().out
    manifest = Manifest.load(out)
    assert manifest.size_cap == {"max_side": 64, "resized": 1}
    with tarfile.open(manifest.shard_paths("train")[0]) as tar:
        sizes = sorted(Image.open(io.BytesIO(tar.extractfile(m).read())).size for m in tar if m.name.endswith(".jpg"))
    assert sizes == [(50, 40), (64, 48)]
    assert Manifest.load(out).to_dict()["size_cap"]["max_side"] == 64
    assert Path(out / "manifest.json").read_text().count("size_cap") == 1
