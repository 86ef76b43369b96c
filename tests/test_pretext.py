"""The pretext-task methods through the real train loop, one test for all of them: a run stopped and resumed is
bit-identical to a straight one (random tiles, jitter, permutations, masks all come from the per-step seeds),
and 2 ranks under DDP and FSDP2 reproduce one process with 2 micro-batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from dist_pretext_runs import case_dir

from pretrain.config import ConfigError
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import assert_equal_states, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
# Each task at 16 px with ViT-tiny/4 (the tiny run's sizes) and its smallest settings.
PRETEXT = {
    # 4 images a micro-batch: the method turns each 4 ways, so the encoder still sees 16
    "rotation": ("rotation_vit_tiny_digits.toml", ["method.name=rotation", "data.batch_size=4"]),
    "jigsaw": (
        "jigsaw_vit_tiny_digits.toml",
        [
            "method.name=jigsaw",
            "method.jigsaw.tile_size=4",
            "method.jigsaw.gap=1",
            "method.jigsaw.jitter=1",
            "method.jigsaw.permutations=10",
            "method.jigsaw.head_hidden_dim=16",
        ],
    ),
    "relative_patch": (
        "relative_patch_vit_tiny_digits.toml",
        [
            "method.name=relative_patch",
            "method.relative_patch.tile_size=4",
            "method.relative_patch.gap=1",
            "method.relative_patch.jitter=1",
            "method.relative_patch.chroma=drop",
            "method.relative_patch.head_hidden_dim=16",
        ],
    ),
    "inpainting": (
        "inpainting_vit_tiny_digits.toml",
        [
            "method.name=inpainting",
            "method.inpainting.mask=random_blocks",
            "method.inpainting.block_size=4",
            "method.inpainting.disc_channels=8",
            "method.inpainting.disc_layers=2",
        ],
    ),
    # Split-brain: both halves (L -> ab, ab -> L) and the prior counted on the shards by every rank.
    "colorization": (
        "colorization_vit_tiny_digits.toml",
        ["method.name=colorization", "method.colorization.split_brain=true", "method.colorization.prior_images=20"],
    ),
}


RESNET = ["model.arch=resnet18", "model.resnet_stem=small"]
# The tasks on a ResNet-18 too (small stem: 8 px cells), resumed the same way.
CASES = {
    **PRETEXT,
    "rotation-resnet18": ("rotation_vit_tiny_digits.toml", [*PRETEXT["rotation"][1], *RESNET]),
    "jigsaw-resnet18": (
        "jigsaw_vit_tiny_digits.toml",
        [*PRETEXT["jigsaw"][1], *RESNET, "data.image_size=32", "method.jigsaw.tile_size=8"],
    ),
    # the dense heads: the ResNet's feature map up-convolved (to pixels; to the bin logits of both halves)
    "inpainting-resnet18": ("inpainting_vit_tiny_digits.toml", [*PRETEXT["inpainting"][1], *RESNET]),
    "colorization-resnet18": ("colorization_vit_tiny_digits.toml", [*PRETEXT["colorization"][1], *RESNET]),
}


def overrides(name: str, out: Path, shards: Path, *extra: str) -> list[str]:
    return tiny_overrides(
        out, shards, "model.attn_backend=reference", "tracking.enabled=false", *CASES[name][1], *extra
    )


def config(name: str) -> Path:
    return REPO / "configs" / CASES[name][0]


@pytest.mark.parametrize("name", list(CASES))
def test_resume_is_bit_identical(tmp_path, digit_shards, name):
    first = Trainer(load_config(config(name), overrides(name, tmp_path / "a", digit_shards)))
    straight = first.fit()
    again = overrides(name, tmp_path / "b", digit_shards)
    Trainer(load_config(config(name), again)).fit(until=3)
    resumed = Trainer(load_config(config(name), again))
    result = resumed.fit()
    assert result.losses == straight.losses[3:]
    assert_equal_states(resumed.method.state_dict(), first.method.state_dict())
    # the encoder kNN and the probe read is the ResNet, pooled (colorization's wraps it: RGB in, L to the ResNet)
    if name.endswith("resnet18") and not name.startswith("colorization"):
        encoder = resumed.method.inference_network()
        assert type(encoder).__name__ == "ResNet" and encoder.forward_features(torch.zeros(2, 3, 32, 32)).shape == (
            2,
            512,
        )


def test_pretext_tasks_check_the_resnet_input_sizes(tmp_path, digit_shards):
    with pytest.raises(ConfigError, match=r"method.jigsaw.tile_size: 4 px is smaller than the 8 px"):
        load_config(config("jigsaw"), overrides("jigsaw", tmp_path, digit_shards, *RESNET))
    with pytest.raises(ConfigError, match=r"method.rotation.pool: a ResNet's pooled feature is the global average"):
        load_config(
            config("rotation"), overrides("rotation", tmp_path, digit_shards, *RESNET, "method.rotation.pool=cls")
        )


ENGINES = ["ddp", "fsdp"]


def three_steps(name: str) -> list[str]:
    # Colorization's second (split-brain) network is resumed above; one network shows the engines agree.
    return ["train.steps=3", *(["method.colorization.split_brain=false"] if name == "colorization" else [])]


def two_ranks_overrides(name: str, engine: str, out: Path, shards: Path) -> list[str]:
    """The 2-rank run of test_two_ranks_match_one_process (tests/dist_pretext_runs.py trains it)."""
    return overrides(name, out, shards, f"engine.kind={engine}", *three_steps(name))


@pytest.fixture(scope="module")
def two_rank_runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, digit_shards) -> Path:
    """The 2-rank runs of the selected test_two_ranks_match_one_process cases, from one torchrun (see
    tests/dist_pretext_runs.py): the directory that holds them."""
    from test_engines import torchrun

    out = tmp_path_factory.mktemp("pretext-two-ranks")
    cases = [
        f"{item.callspec.params['name']},{item.callspec.params['engine']}"
        for item in request.session.items
        if item.module is request.module and item.originalname == "test_two_ranks_match_one_process"
    ]
    torchrun(2, [str(REPO / "tests/dist_pretext_runs.py"), str(out), str(digit_shards), *cases])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(PRETEXT))
def test_two_ranks_match_one_process(tmp_path, digit_shards, two_rank_runs, name, engine):
    """2 ranks x batch 8 == 1 process x 2 micro-batches of 8: same samples, random draws and updates."""
    single = overrides(
        name, tmp_path / "one", digit_shards, "data.num_workers=2", "optim.accum_steps=2", *three_steps(name)
    )
    one = Trainer(load_config(config(name), single)).fit()
    run = case_dir(two_rank_runs, name, engine)
    errors = sorted(run.glob("error-rank*.txt"))
    assert not errors, "\n".join(f"{e.name}:\n{e.read_text()}" for e in errors)
    lines = (run / "tiny" / "metrics.jsonl").read_text().splitlines()
    two = [json.loads(line)["loss"] for line in lines]
    assert len(two) == 3
    assert two == pytest.approx(one.losses, rel=1e-5, abs=1e-6)
