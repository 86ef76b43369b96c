"""`pretrain ckpt import`: files in the released MAE, DINO, MoCo v1/v2/v3 and DiT layouts (random weights, names and
shapes as the released code writes them) become our checkpoints, whose networks compute what a direct
implementation of the released conventions computes on the file's tensors; wrong files fail clearly."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import read_meta
from pretrain.ckpt.export import export_weights
from pretrain.ckpt.import_checkpoint import import_checkpoint
from pretrain.ckpt.load import load_method
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.recipes import load_config
from pretrain.train import Trainer

from released_conventions import (
    dino_head,
    dino_loss,
    moco_mlp,
    moco_v1_v2_logits,
    moco_v3_loss,
    row_first_sincos_table,
    vit_cls,
)

REPO = Path(__file__).resolve().parents[1]
DIM, DEPTH, HEADS, PATCH, IMAGE = 192, 12, 3, 4, 16  # ViT-tiny/4 on 16 px: 16 patches
GRID = IMAGE // PATCH


def col_first_table(grid: int, dim: int) -> torch.Tensor:
    """The MAE/DiT fixed table: the row-first one with its halves swapped (column first)."""
    table = row_first_sincos_table(grid, dim)
    return torch.cat([table[:, dim // 2 :], table[:, : dim // 2]], dim=1)


def released_vit(dim: int = DIM, depth: int = DEPTH, table: torch.Tensor | None = None, mlp: int = 4) -> dict:
    """A timm-layout ViT encoder: cls_token [1, 1, D], pos_embed [1, N + 1, D], patch_embed.proj (a conv),
    blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}, norm."""
    g = torch.Generator().manual_seed(depth * 7 + dim)
    r = lambda *shape, s=0.02: torch.randn(*shape, generator=g) * s  # noqa: E731
    w = {
        "cls_token": r(1, 1, dim),
        "pos_embed": table[None] if table is not None else r(1, GRID * GRID + 1, dim),
        "patch_embed.proj.weight": r(dim, 3, PATCH, PATCH, s=0.1),
        "patch_embed.proj.bias": r(dim),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        w.update({
            b + "norm1.weight": 1 + r(dim, s=0.1), b + "norm1.bias": r(dim),
            b + "attn.qkv.weight": r(3 * dim, dim, s=0.05), b + "attn.qkv.bias": r(3 * dim),
            b + "attn.proj.weight": r(dim, dim, s=0.05), b + "attn.proj.bias": r(dim),
            b + "norm2.weight": 1 + r(dim, s=0.1), b + "norm2.bias": r(dim),
            b + "mlp.fc1.weight": r(mlp * dim, dim, s=0.05), b + "mlp.fc1.bias": r(mlp * dim),
            b + "mlp.fc2.weight": r(dim, mlp * dim, s=0.05), b + "mlp.fc2.bias": r(dim),
        })  # fmt: skip
    w.update({"norm.weight": 1 + r(dim, s=0.1), "norm.bias": r(dim)})
    return w


def images(n: int = 4, size: int = IMAGE) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(3))


def common(*extra: str) -> list[str]:
    return [f"data.image_size={IMAGE}", f"model.patch_size={PATCH}", "data.shards=/nonexistent", *extra]


# ------------------------------------------------------------------------------------------------ MAE


def mae_file(path: Path, decoder: bool = True) -> dict:
    model = released_vit(table=col_first_table(GRID, DIM))
    if decoder:
        dec = released_vit(dim=32, depth=1, table=col_first_table(GRID, 32))
        model["mask_token"] = torch.randn(1, 1, 32)
        model["decoder_embed.weight"], model["decoder_embed.bias"] = torch.randn(32, DIM) * 0.02, torch.zeros(32)
        model["decoder_pos_embed"] = dec["pos_embed"]
        model.update({f"decoder_{k}": v for k, v in dec.items() if k.startswith("blocks.")})
        model["decoder_norm.weight"], model["decoder_norm.bias"] = dec["norm.weight"], dec["norm.bias"]
        model["decoder_pred.weight"] = torch.randn(PATCH * PATCH * 3, 32) * 0.02
        model["decoder_pred.bias"] = torch.zeros(PATCH * PATCH * 3)
    torch.save({"model": model}, path)
    return model


MAE = ["method.mae.decoder_dim=32", "method.mae.decoder_depth=1", "method.mae.decoder_heads=2"]


def test_mae_import_runs_the_released_encoder(tmp_path):
    model = mae_file(tmp_path / "mae.pth")
    config = REPO / "configs/mae_vit_tiny_digits.toml"
    done = import_checkpoint("mae", tmp_path / "mae.pth", config, tmp_path / "run", common(*MAE))
    _, method, _ = load_method(tmp_path / "run")
    x = images()
    expected = vit_cls(model, x, DEPTH, HEADS, PATCH, cls_position=False)
    assert torch.allclose(method.backbone.forward_features(x), expected, atol=1e-5)
    assert torch.equal(method.decoder_pred.weight, model["decoder_pred.weight"])
    assert read_meta(Path(done["checkpoint"]))["imported_from"]["layout"] == "mae"


def test_mae_encoder_only_file_keeps_the_decoder_initialized_and_says_so(tmp_path):
    mae_file(tmp_path / "mae.pth", decoder=False)
    config = REPO / "configs/mae_vit_tiny_digits.toml"
    done = import_checkpoint("mae", tmp_path / "mae.pth", config, tmp_path / "run", common(*MAE))
    assert any("encoder only" in note for note in done["notes"])


def test_transposed_fixed_table_fails_naming_the_option(tmp_path):
    model = mae_file(tmp_path / "mae.pth")
    model["pos_embed"] = row_first_sincos_table(GRID, DIM)[None]
    torch.save({"model": model}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match="model.sincos_order"):
        import_checkpoint(
            "mae", tmp_path / "mae.pth", REPO / "configs/mae_vit_tiny_digits.toml", tmp_path / "r", common(*MAE)
        )


# ------------------------------------------------------------------------------------------------ DINO

DINO = [
    "method.dino.out_dim=40",
    "method.dino.hidden_dim=48",
    "method.dino.bottleneck_dim=16",
    "data.local_crop_size=8",
]
DINO_CONFIG = REPO / "configs/dino_vit_tiny_digits.toml"


def released_dino_head(seed: int, norm_last_layer: bool = True) -> dict:
    g = torch.Generator().manual_seed(seed)
    dims = [DIM, 48, 48, 16]
    head = {}
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        head[f"mlp.{2 * i}.weight"], head[f"mlp.{2 * i}.bias"] = (
            torch.randn(b, a, generator=g) * 0.05,
            torch.randn(b, generator=g) * 0.01,
        )
    head["last_layer.weight_g"] = torch.ones(40, 1) if norm_last_layer else 1 + 0.1 * torch.rand(40, 1, generator=g)
    head["last_layer.weight_v"] = torch.randn(40, 16, generator=g)
    return head


def dino_training_file(path: Path, extra: dict | None = None) -> dict:
    student = {
        **{f"backbone.{k}": v for k, v in released_vit().items()},
        **{f"head.{k}": v for k, v in released_dino_head(1).items()},
    }
    teacher_vit = {k: v + 0.01 for k, v in released_vit().items()}
    teacher = {
        **{f"backbone.{k}": v for k, v in teacher_vit.items()},
        **{f"head.{k}": v for k, v in released_dino_head(2).items()},
    }
    content = {
        "student": {f"module.{k}": v for k, v in student.items()},  # the DDP-wrapped student
        "teacher": teacher,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]},
        "epoch": 100,
        "dino_loss": {"center": torch.randn(1, 40) * 0.1},
        **(extra or {}),
    }
    torch.save(content, path)
    return content


def test_dino_training_checkpoint_gives_the_released_loss(tmp_path):
    content = dino_training_file(tmp_path / "checkpoint.pth")
    import_checkpoint("dino", tmp_path / "checkpoint.pth", DINO_CONFIG, tmp_path / "run", common(*DINO))
    cfg, method, _ = load_method(tmp_path / "run")
    method.train()
    views = [images(), images() * 0.5, images(size=8), images(size=8) * 2]
    loss = method({"image": views})["loss"]
    student = {k[len("module.") :]: v for k, v in content["student"].items()}
    teacher = content["teacher"]

    def out(w, x):
        w = {k[len("backbone.") :]: v for k, v in w.items() if k.startswith("backbone.")} | {
            k: v for k, v in w.items() if k.startswith("head.")
        }
        return dino_head(w, "head.", vit_cls(w, x, DEPTH, HEADS, PATCH, cls_position=True), 3)

    reference = dino_loss(
        [out(student, v) for v in views],
        [out(teacher, v) for v in views[:2]],
        content["dino_loss"]["center"][0],
        0.1,
        0.04,
    )
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)


def test_dino_backbone_file_round_trips_through_export(tmp_path):
    backbone = released_vit()
    torch.save(backbone, tmp_path / "dino_deittiny4_pretrain.pth")
    done = import_checkpoint(
        "dino", tmp_path / "dino_deittiny4_pretrain.pth", DINO_CONFIG, tmp_path / "run", common(*DINO)
    )
    assert any("backbone-only" in note for note in done["notes"])
    _, method, _ = load_method(tmp_path / "run")
    x = images()
    assert torch.allclose(
        method.inference_network().forward_features(x), vit_cls(backbone, x, DEPTH, HEADS, PATCH, True), atol=1e-5
    )
    export_weights(tmp_path / "run", tmp_path / "teacher.safetensors")
    exported = load_file(str(tmp_path / "teacher.safetensors"))
    assert exported.keys() == backbone.keys() and all(torch.equal(exported[k], backbone[k]) for k in backbone)
    torch.save(exported, tmp_path / "again.pth")  # the export is the released backbone layout again
    import_checkpoint("dino", tmp_path / "again.pth", DINO_CONFIG, tmp_path / "run2", common(*DINO))
    _, again, _ = load_method(tmp_path / "run2")
    assert all(torch.equal(again.teacher_backbone.state_dict()[k], v) for k, v in backbone.items())


def test_imported_checkpoint_starts_training_and_evaluation(tmp_path, digit_shards):
    dino_training_file(tmp_path / "checkpoint.pth")
    extra = [f'data.shards="{digit_shards}"', "data.num_workers=0", "data.batch_size=8", "data.local_crops=2"]
    import_checkpoint("dino", tmp_path / "checkpoint.pth", DINO_CONFIG, tmp_path / "run", [*common(*DINO), *extra])
    from pretrain.eval.run import evaluate_knn

    assert 0 <= evaluate_knn(tmp_path / "run")["knn_top1"] <= 1
    overrides = [
        *common(*DINO),
        *extra,
        f'run.output_dir="{tmp_path}"',
        "run.name=ft",
        "train.steps=1",
        "optim.warmup_steps=0",
    ]
    cfg = load_config(DINO_CONFIG, [*overrides, f'train.init_from="{tmp_path / "run"}"'])
    trainer = Trainer(cfg)
    _, imported, _ = load_method(tmp_path / "run")
    for name, value in imported.state_dict().items():
        assert torch.equal(trainer.method.state_dict()[name], value), name
    assert trainer.step == 0
    with pytest.raises(ConfigError, match="train.init_from"):
        Trainer(
            load_config(
                DINO_CONFIG, [*overrides, "run.name=again", f'train.resume="{tmp_path / "run" / "checkpoints"}"']
            )
        )


# ------------------------------------------------------------------------------------------------ MoCo v3

MOCO = ["method.moco.proj_dim=8", "method.moco.mlp_dim=24"]
MOCO_CONFIG = REPO / "configs/moco_v3_vit_tiny_digits.toml"


def released_bn(prefix: str, dim: int, affine: bool, g: torch.Generator) -> dict:
    w = {f"{prefix}running_mean": torch.zeros(dim), f"{prefix}running_var": torch.ones(dim),
         f"{prefix}num_batches_tracked": torch.tensor(5)}  # fmt: skip
    if affine:
        w[f"{prefix}weight"], w[f"{prefix}bias"] = (
            1 + 0.1 * torch.randn(dim, generator=g),
            0.1 * torch.randn(dim, generator=g),
        )
    return w


def released_moco_mlp(dims: list[int], seed: int) -> dict:
    """Linear(bias=False), BN, ReLU, ..., Linear, BN(affine=False): Sequential indices 0, 1, (2), 3, 4, ..."""
    g, w, index = torch.Generator().manual_seed(seed), {}, 0
    for layer, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        last = layer == len(dims) - 2
        w[f"{index}.weight"] = torch.randn(b, a, generator=g) / math.sqrt(a)
        w.update(released_bn(f"{index + 1}.", b, affine=not last, g=g))
        index += 2 if last else 3
    return w


def moco_file(path: Path, table: torch.Tensor | None = None) -> dict:
    table = row_first_sincos_table(GRID, DIM) if table is None else table
    state = {}
    for name, seed in (("base_encoder", 0), ("momentum_encoder", 1)):
        vit = released_vit(table=table)
        vit = {k: v + 0.01 * seed for k, v in vit.items()} | {"pos_embed": table[None]}
        head = released_moco_mlp([DIM, 24, 24, 8], seed + 10)
        state.update({f"module.{name}.{k}": v for k, v in vit.items()})
        state.update({f"module.{name}.head.{k}": v for k, v in head.items()})
    state.update({f"module.predictor.{k}": v for k, v in released_moco_mlp([8, 24, 8], 20).items()})
    torch.save({"epoch": 300, "arch": "vit_tiny", "state_dict": state, "optimizer": {}, "scaler": {}}, path)
    return state


def test_moco_v3_file_gives_the_released_loss(tmp_path):
    state = moco_file(tmp_path / "moco.pth.tar")
    done = import_checkpoint("moco_v3", tmp_path / "moco.pth.tar", MOCO_CONFIG, tmp_path / "run", common(*MOCO))
    assert any("running_mean" in d for d in done["dropped"])
    _, method, _ = load_method(tmp_path / "run")
    method.train()
    views = [images(6), images(6) * -1]
    loss = method({"image": views})["loss"]
    base = {k[len("module.base_encoder.") :]: v for k, v in state.items() if k.startswith("module.base_encoder.")}
    momentum = {
        k[len("module.momentum_encoder.") :]: v for k, v in state.items() if k.startswith("module.momentum_encoder.")
    }
    predictor = {k[len("module.predictor.") :]: v for k, v in state.items() if k.startswith("module.predictor.")}
    q1, q2 = (
        moco_mlp(predictor, "", moco_mlp(base, "head.", vit_cls(base, x, DEPTH, HEADS, PATCH, False), 3), 2)
        for x in views
    )
    k1, k2 = (moco_mlp(momentum, "head.", vit_cls(momentum, x, DEPTH, HEADS, PATCH, False), 3) for x in views)
    assert loss.item() == pytest.approx(moco_v3_loss(q1, q2, k1, k2, 0.2).item(), rel=1e-5)


def test_moco_file_against_a_predictor_without_last_bn_fails_naming_the_option(tmp_path):
    moco_file(tmp_path / "moco.pth.tar")
    overrides = common(*MOCO, "method.moco.predictor_last_bn=false")
    with pytest.raises(ValueError, match="method.moco.predictor_last_bn"):
        import_checkpoint("moco_v3", tmp_path / "moco.pth.tar", MOCO_CONFIG, tmp_path / "run", overrides)


# ------------------------------------------------------------------------------------------------ DiT

DIT = ["method.dit.hidden_dim=32", "method.dit.depth=1", "method.dit.num_heads=2", "method.dit.num_classes=5"]
DIT_CONFIG = REPO / "configs/dit_digits.toml"


def dit_file(path: Path) -> dict:
    """The released EMA state dict: learned sigma (2 x 1 output channels), 5 classes + the null row."""
    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    d, p, c, grid = 32, 4, 1, 4
    table = col_first_table(grid, d)[1:]
    w = {
        "x_embedder.proj.weight": r(d, c, p, p), "x_embedder.proj.bias": r(d),
        "t_embedder.mlp.0.weight": r(d, 256), "t_embedder.mlp.0.bias": r(d),
        "t_embedder.mlp.2.weight": r(d, d), "t_embedder.mlp.2.bias": r(d),
        "y_embedder.embedding_table.weight": r(6, d), "pos_embed": table[None],
        "blocks.0.attn.qkv.weight": r(3 * d, d), "blocks.0.attn.qkv.bias": r(3 * d),
        "blocks.0.attn.proj.weight": r(d, d), "blocks.0.attn.proj.bias": r(d),
        "blocks.0.mlp.fc1.weight": r(4 * d, d), "blocks.0.mlp.fc1.bias": r(4 * d),
        "blocks.0.mlp.fc2.weight": r(d, 4 * d), "blocks.0.mlp.fc2.bias": r(d),
        "blocks.0.adaLN_modulation.1.weight": r(6 * d, d), "blocks.0.adaLN_modulation.1.bias": r(6 * d),
        "final_layer.linear.weight": r(p * p * 2 * c, d), "final_layer.linear.bias": r(p * p * 2 * c),
        "final_layer.adaLN_modulation.1.weight": r(2 * d, d), "final_layer.adaLN_modulation.1.bias": r(2 * d),
    }  # fmt: skip
    torch.save(w, path)
    return w


def test_dit_ema_file_drops_the_variance_outputs(tmp_path):
    w = dit_file(tmp_path / "DiT-tiny.pt")
    done = import_checkpoint("dit", tmp_path / "DiT-tiny.pt", DIT_CONFIG, tmp_path / "run", DIT)
    assert any("learned-sigma" in n for n in done["notes"]) and any("DDPM" in n for n in done["notes"])
    _, method, _ = load_method(tmp_path / "run")
    assert torch.equal(method.ema.y_embedder.weight, w["y_embedder.embedding_table.weight"])
    assert torch.equal(method.model.x_embedder.weight, w["x_embedder.proj.weight"])
    tokens = torch.randn(2, 16, 32)
    released = (tokens @ w["final_layer.linear.weight"].T + w["final_layer.linear.bias"]).view(2, 16, 4 * 4, 2)
    assert torch.allclose(method.ema.final_layer.linear(tokens), released[..., 0], atol=1e-6)  # eps, not sigma


# ------------------------------------------------------------------------------------------------ wrong files


def test_unknown_missing_and_misshaped_keys_are_listed(tmp_path):
    model = mae_file(tmp_path / "mae.pth")
    model["blocks.0.attn.extra"] = torch.zeros(3)
    del model["blocks.11.mlp.fc2.bias"]
    model["norm.weight"] = torch.ones(100)
    torch.save({"model": model}, tmp_path / "mae.pth")
    with pytest.raises(ValueError) as error:
        import_checkpoint(
            "mae", tmp_path / "mae.pth", REPO / "configs/mae_vit_tiny_digits.toml", tmp_path / "r", common(*MAE)
        )
    text = str(error.value)
    assert "backbone.blocks.0.attn.extra" in text and "backbone.blocks.11.mlp.fc2.bias" in text
    assert "backbone.norm.weight: shape (100,) in the file, (192,) in the method" in text


def test_a_file_that_needs_code_to_load_is_refused(tmp_path, capsys):
    dino_training_file(tmp_path / "checkpoint.pth", extra={"args": argparse.Namespace(arch="vit_small")})
    args = ["ckpt", "import", "--from", "dino", str(tmp_path / "checkpoint.pth"), "--config", str(DINO_CONFIG)]
    args += ["--out", str(tmp_path / "run"), *[a for o in common(*DINO) for a in ("--set", o)]]
    assert main(args) == 2
    message = capsys.readouterr().err
    assert "needs more than tensors and plain containers" in message and "never executed" in message
    assert not (tmp_path / "run").exists()


def test_wrong_layout_and_wrong_method_fail_clearly(tmp_path):
    moco_file(tmp_path / "moco.pth.tar")
    with pytest.raises(ValueError, match="not a released DINO file"):
        import_checkpoint("dino", tmp_path / "moco.pth.tar", DINO_CONFIG, tmp_path / "r", common(*DINO))
    with pytest.raises(ValueError, match="method.name = 'moco'"):
        import_checkpoint("moco_v3", tmp_path / "moco.pth.tar", DINO_CONFIG, tmp_path / "r", common(*DINO))


def test_cli_import_prints_the_checkpoint_and_notes(tmp_path, capsys):
    torch.save(released_vit(), tmp_path / "backbone.pth")
    args = ["ckpt", "import", "--from", "dino", str(tmp_path / "backbone.pth"), "--config", str(DINO_CONFIG)]
    args += ["--out", str(tmp_path / "run"), *[a for o in common(*DINO) for a in ("--set", o)]]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "step_00000000" in out and "note: a backbone-only file" in out and "train.init_from" in out


def _deepspeed_dir(path: Path, extra: dict) -> Path:
    path.mkdir(parents=True)
    state = {"param_shapes": [{"w": torch.Size([3, 4])}], "ds_config": {"zero_optimization": {"stage": 2}}, **extra}
    torch.save(state, path / "mp_rank_00_model_states.pt")
    torch.save({}, path / "rank_00000.pt")
    meta = {"format": "deepspeed", "world_size": 1, "step": 1, "config": {}}
    (path / "meta.json").write_text(__import__("json").dumps(meta))
    return path


def test_inspect_reads_deepspeed_files_with_tensors_only(tmp_path):
    from pretrain.ckpt.inspect import inspect_checkpoint

    plain = inspect_checkpoint(_deepspeed_dir(tmp_path / "plain", {}))["deepspeed"]
    assert plain["zero_stage"] == 2 and plain["model"] == {"tensors": 1, "parameters": 12}
    unsafe = inspect_checkpoint(_deepspeed_dir(tmp_path / "unsafe", {"args": argparse.Namespace(x=1)}))["deepspeed"]
    assert "zero_stage" not in unsafe and "never executed" in unsafe["note"]


# ------------------------------------------------------------------------------------------------ MoCo v1/v2


@pytest.mark.parametrize("version", [1, 2])
def test_moco_v1_v2_file_gives_the_released_loss_and_queue_update(tmp_path, version):
    """A main_moco.py checkpoint (ResNet-18 encoders with their fc heads, the queue stored [dim, K]) imported
    into moco_v1 / moco_v2: on one GPU the released code normalizes the whole batch in each BatchNorm and its
    shuffle then changes nothing, so with bn_group_size = the batch the loss is the released one on the
    file's tensors, and the keys enter the queue at the file's pointer."""
    from pretrain.models.resnet import build_resnet

    gen = torch.Generator().manual_seed(version)
    encoders = {}
    for name in ("encoder_q", "encoder_k"):
        net = build_resnet(18, num_classes=16, stem="small")
        if version == 2:  # --mlp: fc becomes Linear(512, 512) -> ReLU -> the 512 -> 16 fc
            net.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), net.fc)
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * 0.05 + (1.0 if tensor.ndim == 1 else 0.0))
        encoders[name] = net
    queue = torch.nn.functional.normalize(torch.randn(16, 8, generator=gen), dim=0)
    state = {f"module.{n}.{k}": v for n, net in encoders.items() for k, v in net.state_dict().items()}
    state |= {"module.queue": queue, "module.queue_ptr": torch.tensor([6])}
    torch.save({"epoch": 200, "arch": "resnet18", "state_dict": state}, tmp_path / "moco.pth.tar")
    section = f"method.moco_v{version}"
    sets = ["model.arch=resnet18", "model.resnet_stem=small", "data.image_size=16", "data.batch_size=4"]
    sets += [f"method.name=moco_v{version}", f"{section}.proj_dim=16", f"{section}.queue_size=8"]
    sets += [f"{section}.bn_group_size=4", "data.shards=/nonexistent"]
    import_checkpoint(f"moco_v{version}", tmp_path / "moco.pth.tar", None, tmp_path / "run", sets)
    _, method, _ = load_method(tmp_path / "run")
    method.train()
    for net in encoders.values():
        net.train()
    views = [images(4), images(4).flip(-1)]
    loss = method({"image": views})["loss"]
    with torch.no_grad():
        logits = moco_v1_v2_logits(
            encoders["encoder_q"](views[0]), encoders["encoder_k"](views[1]), queue, method.temperature
        )
        expected = torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.long))
        keys = torch.nn.functional.normalize(encoders["encoder_k"](views[1]), dim=1)
    assert method.temperature == (0.07 if version == 1 else 0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the released _dequeue_and_enqueue writes queue[:, ptr:ptr + 4] = keys.T (it requires K to be a multiple
    # of the batch; from pointer 6 of 8 ours wraps around)
    torch.testing.assert_close(method.queue[[6, 7, 0, 1]], keys, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(method.queue[2:6], queue.T[2:6])
    assert int(method.queue_ptr) == 2
