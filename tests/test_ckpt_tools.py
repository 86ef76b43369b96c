"""`pretrain ckpt inspect` and `pretrain ckpt export` on a real checkpoint of a 2-step tiny run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pretrain.ckpt.export import export_weights
from pretrain.ckpt.inspect import inspect_checkpoint
from pretrain.cli import main
from pretrain.models.vit import build_vit, count_parameters
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import tiny_overrides


@pytest.fixture(scope="module")
def trained(module_tmp, digit_shards: Path):
    """A finished 2-step run: (trainer, its final checkpoint directory)."""
    out = module_tmp("run")
    cfg = load_config(None, tiny_overrides(out, digit_shards, "train.steps=2", "tracking.enabled=false"))
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.step == 2 and result.checkpoint is not None
    return trainer, Path(result.checkpoint)


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> int:
    states = optimizer.state_dict()["state"].values()
    return sum(isinstance(value, torch.Tensor) for state in states for value in state.values())


def test_inspect_reads_meta_config_and_tensor_sizes(trained, capsys):
    trainer, ckpt = trained
    method, optimizer = trainer.method, trainer.optimizer
    info = inspect_checkpoint(trainer.run_dir)  # a run directory stands for its latest checkpoint
    assert Path(info["checkpoint"]) == ckpt
    assert (info["step"], info["engine"], info["format"], info["world_size"]) == (2, "single", "dcp", 1)
    assert info["samples_seen"] == 16 and info["mlflow_run_id"] is None and info["saved_at"]

    config = info["config"]
    assert [config[k] for k in ("method", "model_size", "patch_size", "image_size")] == ["mae", "tiny", 4, 16]
    assert config["global_batch"] == 8 and config["train_steps"] == 2
    assert config["peak_lr"] == pytest.approx(1e-3 * 8 / 256) and config["lr_scaling"] == "linear"

    model = info["tensors"]["model"]
    assert model["parameters"] == count_parameters(method) and model["tensors"] == len(method.state_dict())
    assert model["encoder"]["parameters"] == count_parameters(method.inference_network())
    assert model["encoder"]["tensors"] == len(method.inference_network().state_dict())
    encoder = method.inference_network()  # ViT-tiny/4 at 16 px: 16 patches + cls, the ViT paper's 1000 classes
    assert model["encoder"]["trainable_parameters"] == count_parameters(encoder)
    assert model["encoder"]["published_parameters"] == count_parameters(encoder) + 17 * 192 + 192 * 1000 + 1000
    assert model["bytes"] == 4 * model["parameters"] and model["dtypes"] == {"float32": model["parameters"]}
    optim = info["tensors"]["optim"]
    assert optim["tensors"] == _optimizer_tensors(optimizer)
    assert optim["parameters_with_state"] == len(optimizer.state_dict()["state"])
    assert optim["param_groups"] == len(optimizer.param_groups)
    assert info["disk"]["bytes"] == sum(p.stat().st_size for p in ckpt.rglob("*") if p.is_file())

    assert main(["ckpt", "inspect", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "step             2 of 2" in text
    assert "engine           single, format dcp, world size 1" in text
    assert f"{count_parameters(method):,} parameters" in text
    assert f"{optim['tensors']} tensors" in text
    assert "global batch     8 = 8 per process x 1 accum x 1 process" in text
    assert (
        f"encoder params   {count_parameters(encoder):,} trainable, {model['encoder']['published_parameters']:,} as the papers count them"
        in text
    )


def test_inspect_json_mode(trained, capsys):
    trainer, ckpt = trained
    assert main(["ckpt", "inspect", str(ckpt.parent), "--json"]) == 0  # the checkpoints directory works too
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(inspect_checkpoint(ckpt)))
    assert printed["tensors"]["model"]["parameters"] == count_parameters(trainer.method)


def test_export_encoder_loads_strictly_into_a_vit(trained, tmp_path, capsys):
    trainer, ckpt = trained
    out = tmp_path / "encoder.safetensors"
    assert main(["ckpt", "export", str(trainer.run_dir), "--out", str(out)]) == 0
    assert "encoder of step 2" in capsys.readouterr().out

    weights = load_file(out)
    vit = build_vit("tiny", img_size=16, patch_size=4)
    vit.load_state_dict(weights, strict=True)
    trained_encoder = trainer.method.inference_network()
    expected = trained_encoder.state_dict()
    assert weights.keys() == expected.keys() and "blocks.0.attn.qkv.weight" in weights
    for name, tensor in expected.items():
        assert weights[name].dtype == torch.float32
        assert torch.equal(weights[name], tensor), name
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(vit.eval().forward_features(images), trained_encoder.eval().forward_features(images))

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["step"] == "2" and meta["method"] == "mae" and meta["part"] == "encoder"
    assert (meta["model_size"], meta["patch_size"], meta["image_size"]) == ("tiny", "4", "16")
    assert meta["source_checkpoint"] == str(ckpt.resolve()) and meta["dtype"] == "float32"
    assert json.loads(meta["config"])["model"]["size"] == "tiny"
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left behind


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_export_whole_method_with_dtype(trained, tmp_path, dtype):
    trainer, ckpt = trained
    out = tmp_path / "model.safetensors"
    done = export_weights(ckpt, out, part="model", dtype=dtype)
    expected = trainer.method.state_dict()
    weights = load_file(out)
    assert weights.keys() == expected.keys() and "mask_token" in weights and "backbone.cls_token" in weights
    assert done["tensors"] == len(expected) and done["parameters"] == count_parameters(trainer.method)
    target = getattr(torch, dtype)
    for name, tensor in expected.items():
        assert weights[name].dtype == target
        assert torch.equal(weights[name], tensor.to(target)), name
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["part"] == "model" and f.metadata()["dtype"] == dtype


def test_export_refuses_to_overwrite_without_force(trained, tmp_path, capsys):
    _, ckpt = trained
    out = tmp_path / "encoder.safetensors"
    out.write_bytes(b"keep me")
    assert main(["ckpt", "export", str(ckpt), "--out", str(out)]) == 2
    assert f"error: {out} already exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"

    assert main(["ckpt", "export", str(ckpt), "--out", str(out), "--force", "--dtype", "bfloat16"]) == 0
    assert load_file(out)["cls_token"].dtype == torch.bfloat16
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


def test_paths_without_a_checkpoint_exit_2_naming_the_path(trained, tmp_path, capsys):
    _, ckpt = trained
    missing = tmp_path / "nope"
    empty = tmp_path / "empty"
    empty.mkdir()
    partial = tmp_path / "step_00000002"
    shutil.copytree(ckpt, partial)
    (partial / "meta.json").unlink()  # killed before the last file of the checkpoint was written

    cases = [(missing, "no such file or directory"), (empty, "no complete checkpoint"), (partial, "incomplete")]
    for path, why in cases:
        assert main(["ckpt", "inspect", str(path)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(path) in err and why in err
        out = tmp_path / "x.safetensors"
        assert main(["ckpt", "export", str(path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert str(path) in err and why in err and not out.exists()
    main(["ckpt", "inspect", str(partial)])
    assert "missing meta.json" in capsys.readouterr().err
