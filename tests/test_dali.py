"""data.backend = "dali": DALI's CPU pipeline on our shards (skipped without the extra), its exact resume
from the pipeline checkpoint, the skip-and-count of bad shards and images, and a digits MAE trained
through it. The GPU decode (nvJPEG) is checked by the `cuda` test at the end (benchmarks/gpu_check.sh)."""

from pathlib import Path

import pytest
import torch

from data_pipeline.dali_index import image_is_complete, index_shard
from data_pipeline.dali_loader import dali_available
from data_pipeline.shard_writer import write_shards
from data_pipeline.sources import Sample, digits_samples, synthetic_samples

needs_dali = pytest.mark.skipif(dali_available() is not None, reason=str(dali_available()))


def _shards(out: Path, num: int = 24, shard_size: int = 6, samples=None) -> list[str]:
    return write_shards(samples or synthetic_samples(num, 24, seed=1), out, shard_size).shard_paths("train")


def _corrupt(tmp_path: Path) -> tuple[list[str], set[str], str]:
    samples = list(synthetic_samples(20, 24, seed=4))
    bad = samples[3].key
    samples[3] = Sample(bad, None, samples[3].label, "train", data=b"\x89PNG not really", ext="png")
    paths = _shards(tmp_path / "ds", shard_size=5, samples=samples)
    garbage = tmp_path / "ds" / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 50)
    missing = str(tmp_path / "ds" / "missing.tar")
    return paths + [str(garbage), missing], {s.key for s in samples} - {bad}, bad


def test_index_leaves_out_bad_shards_and_images(tmp_path):
    paths, good, bad = _corrupt(tmp_path)
    indexes = [index_shard(p) for p in paths]
    kept = {s[0][3].partition(".")[0] for index in indexes for s in index.samples}
    assert kept == good
    assert indexes[0].bad_samples == [bad]
    assert [bool(i.failure) for i in indexes] == [False] * 4 + [True, True]
    truncated = Path(paths[1])
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    cut = index_shard(str(truncated))
    assert cut.failure and 0 < len(cut.samples) < 5
    assert not image_is_complete("jpg", b"\xff\xd8\xff\xe0 cut short")


@needs_dali
def test_cpu_pipeline_batches_and_exact_resume(tmp_path):
    from data_pipeline.dali_loader import DaliLoader

    paths = _shards(tmp_path / "ds")

    def make():
        return DaliLoader(paths, batch_size=4, views=[(16, (0.2, 1.0)), (8, (0.05, 0.4))], seed=3, shuffle_buffer=8)

    first = make()
    batches = iter(first)
    head = [next(batches) for _ in range(3)]
    assert [v.shape for v in head[0]["image"]] == [(4, 3, 16, 16), (4, 3, 8, 8)]
    assert head[0]["image"][0].dtype == torch.uint8 and head[0]["label"].dtype == torch.long
    state = first.state_dict()
    tail = [next(batches) for _ in range(8)]  # crosses the epoch boundary (24 samples = 6 batches)
    epoch = [k for b in head + tail[:3] for k in b["key"]]
    assert sorted(epoch) == sorted(f"synthetic-{i:07d}" for i in range(24))

    resumed = make()
    resumed.load_state_dict(state)
    again = iter(resumed)
    for expected in tail:
        got = next(again)
        assert got["key"] == expected["key"] and torch.equal(got["label"], expected["label"])
        assert all(torch.equal(g, e) for g, e in zip(got["image"], expected["image"]))
    assert resumed.batches_consumed == first.batches_consumed == 11


@needs_dali
def test_changed_layout_restarts_from_the_first_sample(tmp_path, caplog):
    from data_pipeline.dali_loader import DaliLoader

    paths = _shards(tmp_path / "ds")
    loader = DaliLoader(paths, batch_size=4, views=[(16, (0.2, 1.0))], single=True, seed=3)
    batches = iter(loader)
    [next(batches) for _ in range(2)]
    state = loader.state_dict()
    other = DaliLoader(paths, batch_size=4, views=[(16, (0.2, 1.0))], single=True, seed=4)
    other.load_state_dict(state)
    assert "restarting the pipeline" in caplog.text and other.batches_consumed == 2
    fresh = DaliLoader(paths, batch_size=4, views=[(16, (0.2, 1.0))], single=True, seed=4)
    assert next(iter(other))["key"] == next(iter(fresh))["key"]
    with pytest.raises(ValueError, match="another data.backend"):
        other.load_state_dict({"version": 1})


@needs_dali
def test_bad_data_is_skipped_and_counted_per_epoch(tmp_path):
    from data_pipeline.dali_loader import DaliLoader

    paths, good, bad = _corrupt(tmp_path)
    loader = DaliLoader(paths, batch_size=4, views=[(16, (0.2, 1.0))], single=True, shuffle_buffer=0)
    batches = iter(loader)
    keys = [k for _ in range(5) for k in next(batches)["key"]]  # 19 good samples: one epoch + 1
    assert set(keys[:19]) == good and bad not in keys
    # a bad image, a garbage and a missing shard (their sizes unknown without a manifest); 2 epochs begun
    assert (loader.skipped_total, loader.skipped_shards_total) == (2 * 1, 2 * 2)


@needs_dali
def test_dali_cpu_pipeline_trains_a_digits_mae(tmp_path):
    from pretrain.recipes import load_config
    from pretrain.train import Trainer

    manifest = write_shards(digits_samples(16, 0.2, 0), tmp_path / "digits", 128)
    cfg = load_config(
        "configs/mae_vit_tiny_digits.toml",
        [
            f"data.shards={manifest.path}",
            "data.backend=dali",
            "data.image_size=16",
            "data.batch_size=16",
            "data.num_workers=1",
            "train.steps=6",
            "train.log_every=2",
            "train.ckpt_every=3",
            "train.vis_every=0",
            "optim.warmup_steps=2",
            "tracking.enabled=false",
            f"run.output_dir={tmp_path / 'runs'}",
        ],
    )
    result = Trainer(cfg).fit()
    assert len(result.losses) == 6 and all(torch.isfinite(torch.tensor(result.losses)))
    assert sum(result.losses[-2:]) < sum(result.losses[:2])

    # resume from the step-3 checkpoint: the same last three losses, from DALI's checkpointed position
    resumed_cfg = load_config(
        "configs/mae_vit_tiny_digits.toml",
        [*_overrides_of(cfg), f"train.resume={tmp_path / 'runs' / cfg.run.name / 'checkpoints' / 'step_00000003'}"],
    )
    resumed = Trainer(resumed_cfg).fit()
    assert resumed.losses == pytest.approx(result.losses[3:], rel=1e-5)


def _overrides_of(cfg) -> list[str]:
    return [
        f"data.shards={cfg.data.shards}",
        "data.backend=dali",
        "data.image_size=16",
        "data.batch_size=16",
        "data.num_workers=1",
        "train.steps=6",
        "train.log_every=2",
        "train.ckpt_every=100",
        "train.vis_every=0",
        "optim.warmup_steps=2",
        "tracking.enabled=false",
        f"run.output_dir={cfg.run.output_dir}",
        "run.name=resumed",
    ]
