"""The token transformer on the loop: `pretrain data tokens` against the tokenizer applied directly, the loss
against a direct cross-entropy, checks before any work, bad token records skipped, exact resume, `pretrain eval nll`,
`pretrain sample` with and without the KV cache, and two ranks (DDP, FSDP, ZeRO-3) equal to one process."""

from __future__ import annotations

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from engine_runs import CASES, check_case
from PIL import Image
from test_vq_method import VQ_TINY

from data_pipeline.decode import DecodeError
from data_pipeline.loader import ResumableLoader
from data_pipeline.manifest import Manifest
from data_pipeline.sources import digits_samples
from pretrain.ckpt.load import load_method
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.diffusion.transforms import pixel_transform
from pretrain.methods.gpt import preflight, token_transform
from pretrain.methods.registry import build_method
from pretrain.methods.vq import load_tokenizer
from pretrain.recipes import load_config
from pretrain.sample import sample_grid
from pretrain.token_shards import code_statistics, write_token_shards
from pretrain.train import Trainer

from tiny import check_resume, tiny_overrides

pytestmark = pytest.mark.usefixtures("one_thread")

# The tokenizer of tests/test_vq_method.py, on the digits' one channel.
TOKENIZER = [*VQ_TINY, "method.vq.in_channels=1", "method.vq.dead_code_threshold=1.0", "train.steps=3"]
GPT_TINY = [
    "method.name=gpt",
    "method.gpt.size=small",
    "method.gpt.hidden_dim=16",
    "method.gpt.depth=2",
    "method.gpt.num_heads=2",
    "method.gpt.vocab_size=16",
    "method.gpt.token_grid=4",
    "method.gpt.num_classes=10",
    "method.gpt.vis_samples=1",
    "optim.weight_decay=0.0",
]


@pytest.fixture(scope="module")
def tokens(module_tmp, digit_shards):
    """A VQ tokenizer trained 3 steps on the digits, and the digits' token shards it writes."""
    root = module_tmp("tokens")
    cfg = load_config(None, tiny_overrides(root, digit_shards, "tracking.enabled=false", *TOKENIZER))
    tokenizer_run = Trainer(cfg).fit().checkpoint.parent.parent
    out = root / "digits_tokens"
    write_token_shards(load_tokenizer(tokenizer_run), digit_shards, out, tokenizer_name="the test's", shard_size=200)
    return tokenizer_run, out


def gpt_config(out, tokens, *extra: str):
    tokenizer, shards = tokens
    overrides = tiny_overrides(out, shards, "tracking.enabled=false", f'method.gpt.tokenizer="{tokenizer}"')
    return load_config(None, [*overrides, *GPT_TINY, *extra])


def test_token_shards_hold_the_tokenizers_codes_of_every_image(tokens, digit_shards):
    tokenizer_run, out = tokens
    manifest = Manifest.load(out)
    meta = manifest.tokens
    assert (meta["num_codes"], meta["size"], meta["downsample"]) == (16, 4, 4)
    assert manifest.classes == Manifest.load(digit_shards).classes
    assert {split: manifest.num_samples(split) for split in manifest.splits} == {"train": 1437, "test": 360}
    tokenizer = load_tokenizer(tokenizer_run)
    test = {f"{sample.key}": sample for sample in digits_samples(16) if sample.split == "test"}
    transform, generator = pixel_transform(16, 1, train=False), torch.Generator()
    loader = ResumableLoader(
        manifest.shard_paths("test"), batch_size=64, transform=lambda grid, _: grid, shuffle_buffer=0, infinite=False
    )
    counts, seen = torch.zeros(16, dtype=torch.long), 0
    for batch in loader:
        images = torch.stack([transform(test[key].image, generator) for key in batch["key"]])
        with torch.no_grad():
            direct = tokenizer.encode(images)[1]
        assert batch["image"].dtype == torch.int16 and torch.equal(batch["image"].long(), direct)
        assert torch.equal(batch["label"], torch.tensor([test[key].label for key in batch["key"]]))
        counts += torch.bincount(direct.flatten(), minlength=16)
        seen += len(batch["key"])
    assert seen == 360
    assert meta["codes"]["test"] == pytest.approx(code_statistics(counts))
    p = counts[counts > 0].double() / counts.sum()
    assert meta["codes"]["test"]["perplexity"] == pytest.approx(math.exp(-(p * p.log()).sum()))


def test_the_cli_writes_token_shards_and_names_a_wrong_tokenizer(tokens, digit_shards, tmp_path, capsys):
    tokenizer_run, _ = tokens
    out = tmp_path / "cli_tokens"
    args = ["data", "tokens", "--tokenizer", str(tokenizer_run), "--shards", str(digit_shards), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "test: 1 shards, 360 token grids" in printed and "tokens 4x4 of 16 codes" in printed
    assert main(args) == 2  # shards already there: --overwrite replaces them
    assert "already holds shards" in capsys.readouterr().err
    assert main([*args[:3], str(tmp_path / "nosuch"), *args[4:], "--overwrite"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_the_loss_is_next_token_cross_entropy_with_dropped_labels():
    cfg = load_config(None, [*GPT_TINY, "method.gpt.class_dropout=0.5"])
    torch.manual_seed(0)
    method = build_method(cfg)
    grids = torch.randint(0, 16, (6, 4, 4))
    labels = torch.tensor([0, 1, 2, 3, 4, 9])
    torch.manual_seed(1)
    out = method({"image": grids, "label": labels})
    torch.manual_seed(1)
    dropped = torch.where(torch.rand(6) < 0.5, torch.tensor(10), labels)
    assert (dropped == 10).any() and (dropped != 10).any()
    model, tokens = method.model, grids.flatten(1)
    x = torch.cat([model.class_embed(dropped)[:, None], model.tok_embed(tokens[:, :-1])], dim=1) + model.pos_embed
    for block in model.blocks:
        x = block(x)
    logits = model.head(model.norm(x))
    direct = F.cross_entropy(logits.reshape(-1, 16), tokens.reshape(-1))
    torch.testing.assert_close(out["loss"], direct)
    torch.testing.assert_close(out["bits_per_token"], direct / math.log(2))
    assert abs(float(out["bits_per_token"]) - 4.0) < 0.3  # an untrained model is close to uniform: log2(16)
    with pytest.raises(ValueError, match="integer token grids"):
        method({"image": grids.float(), "label": labels})


def test_the_transform_passes_grids_and_rejects_other_records():
    transform, generator = token_transform(4, 16), torch.Generator()
    grid = torch.arange(16, dtype=torch.int16).view(4, 4)
    assert torch.equal(transform(grid, generator), grid.long())
    with pytest.raises(DecodeError, match=r"outside \[0, 16\)"):
        transform(grid + 1, generator)
    with pytest.raises(TypeError, match="image or latent shards"):
        transform(grid.float(), generator)
    with pytest.raises(ValueError, match="4x4"):
        transform(grid.view(2, 8), generator)


def test_a_record_with_codes_outside_the_vocabulary_is_skipped_and_counted(tmp_path, tokens):
    _, shards = tokens
    source = Manifest.load(shards).shard_paths("test")[0]
    bad = tmp_path / "bad.tar"
    with tarfile.open(source) as src, tarfile.open(bad, "w") as dst:
        grids = 0
        for member in src.getmembers()[:8]:  # 4 records: .cls and .npy members
            data = src.extractfile(member).read()
            if member.name.endswith(".npy") and (grids := grids + 1) == 2:  # the second record's grid
                grid = np.load(io.BytesIO(data))
                grid[0, 0] = 99
                buffer = io.BytesIO()
                np.save(buffer, grid)
                data = buffer.getvalue()
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))
    loader = ResumableLoader([str(bad)], batch_size=2, transform=token_transform(4, 16), infinite=False)
    keys = [key for batch in loader for key in batch["key"]]
    assert len(keys) == 3 and loader.skipped_total == 1


def test_settings_that_disagree_with_the_data_fail_before_any_work(tmp_path, tokens, digit_shards):
    preflight(gpt_config(tmp_path, tokens))
    cases = [
        (["method.gpt.vocab_size=32"], r"method\.gpt\.vocab_size: 32, but the tokenizer .* has 16 codes"),
        (["method.gpt.token_grid=8"], r"method\.gpt\.token_grid: 8, but the tokens at .* are 4x4 grids"),
        (["method.gpt.num_classes=5"], r"method\.gpt\.num_classes: 5 classes, the data .* has 10"),
        ([f'data.shards="{digit_shards}"'], r"data\.shards: .* holds no token manifest"),
        ([f'method.gpt.tokenizer="{digit_shards}"'], r"method\.gpt\.tokenizer: .*no checkpoint|method\.gpt\.tokenizer"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            preflight(gpt_config(tmp_path, tokens, *overrides))
    with pytest.raises(ConfigError, match="method.gpt.size"):
        load_config(None, [*GPT_TINY, "method.gpt.size=huge"])
    with pytest.raises(ConfigError, match="method.gpt.hidden_dim: 16 is not divisible"):
        load_config(None, [*GPT_TINY, "method.gpt.num_heads=3"])


def test_resume_is_bit_identical_and_the_checkpoint_samples(tmp_path, tokens, capsys):
    full, straight, _ = check_resume(lambda out, *extra: gpt_config(out, tokens, *extra), tmp_path)

    # `pretrain eval nll`: bits per token over every test grid, against the model applied directly.
    assert main(["eval", "nll", "--checkpoint", str(full.checkpoint), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    _, method, _ = load_method(full.checkpoint)
    test = ResumableLoader(
        Manifest.load(tokens[1]).shard_paths("test"), batch_size=500, transform=lambda g, _: g, infinite=False
    )
    (batch,) = list(test)
    grids = batch["image"].long().flatten(1)
    with torch.no_grad():
        logits = method.model(grids, batch["label"])
    direct = F.cross_entropy(logits.reshape(-1, 16).double(), grids.reshape(-1)) / math.log(2)
    assert report["unit"] == "token" and report["images"] == 360 and report["tokens_per_image"] == 16
    assert report["bits_per_token"] == pytest.approx(float(direct), rel=1e-6)

    # The picture the loop logs: one row of the first 10 classes, decoded by the tokenizer.
    pictures = straight.method.visuals({"image": torch.zeros(1, 4, 4, dtype=torch.long)})
    assert pictures["samples"].shape == (2 + 18, 2 + 10 * 18, 3)

    grid, how = sample_grid(full.checkpoint, label=3, num=4, cfg_scale=2.0, top_k=5)
    uncached, _ = sample_grid(full.checkpoint, label=3, num=4, cfg_scale=2.0, top_k=5, use_cache=False)
    assert torch.equal(grid, uncached) and grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    assert how == "token by token, temperature 1, top-k 5, top-p 1, guidance scale s=2"
    out = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(full.checkpoint), "--class", "3", "--num", "4", "--cfg-scale", "2"]
    assert main([*args, "--top-k", "5", "--no-kv-cache", "--out", str(out)]) == 0
    assert "token by token" in capsys.readouterr().out
    assert torch.equal(torch.from_numpy(np.array(Image.open(out))), grid)
    assert main([*args, "--class", "10", "--out", str(out)]) == 2
    assert "--class 10 is outside [0, 10)" in capsys.readouterr().err


@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("gpt")])
def test_two_ranks_match_one_process(engine_runs, case) -> None:
    state = check_case(engine_runs, case)
    assert any(name.startswith("model.blocks.") for name in state)
