"""End-to-end fine-tuning (`method.name = "finetune"`, `pretrain eval finetune`): layer-wise learning rates
against MAE's formula, stochastic depth, class-balanced label subsets, bad input failing before any work,
exact resume with every recipe part on, the MLflow link to the pretraining run, and 2 ranks equal to one."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from engine_runs import CASES, check_case

from data_pipeline.augment import eval_transform
from data_pipeline.label_subset import class_balanced_subset, scan_labels
from data_pipeline.loader import ResumableLoader
from data_pipeline.manifest import Manifest
from pretrain.ckpt.load import load_encoder_state
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.engines.parallelize import apply_activation_checkpointing
from pretrain.eval.finetune import evaluate_finetune, finetune_config
from pretrain.methods.finetune import device_transform
from pretrain.methods.mixup import Mixup, soft_target_cross_entropy
from pretrain.methods.registry import build_method
from pretrain.models.transformer import Block, DropPath
from pretrain.models.vit import build_vit
from pretrain.optim import build_optimizer, build_scheduler
from pretrain.recipes import load_config
from pretrain.train import Trainer

from tiny import assert_equal_states, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
DIGITS_RECIPE = REPO / "configs" / "finetune_vit_tiny_digits.toml"
# The digits recipe on the 16 px test shards, 8 images a batch, a few steps.
SMALL = ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=50",
         "optim.warmup_steps=1", "train.log_every=1", "train.ckpt_every=0"]  # fmt: skip


@pytest.fixture(scope="module")
def pretrained(module_tmp, digit_shards) -> Path:
    """A one-step MAE run (ViT-tiny/4 on 16 px digits), tracked in its own sqlite store: what is fine-tuned."""
    out = module_tmp("pretrained")
    cfg = load_config(None, tiny_overrides(out, digit_shards, "train.steps=1", "optim.warmup_steps=1", "run.name=mae"))
    return Trainer(cfg).fit().checkpoint


def finetune_overrides(out: Path, shards: Path, checkpoint: Path | str, *extra: str) -> list[str]:
    """The digits recipe as `pretrain train` overrides, on the tiny MAE encoder."""
    return [
        f'run.output_dir="{out}"',
        "run.name=ft",
        f'data.shards="{shards}"',
        "model.size=tiny",
        "model.patch_size=4",
        "method.name=finetune",
        "method.finetune.num_classes=10",
        f'method.finetune.checkpoint="{checkpoint}"',
        "tracking.enabled=false",
        *SMALL,
        *extra,
    ]


def mae_layer_id(name: str, depth: int) -> int:
    """MAE's get_layer_id_for_vit on this method's names (the encoder under classifier.backbone)."""
    if not name.startswith("classifier.backbone."):
        return depth + 1  # head, fc_norm
    name = name.removeprefix("classifier.backbone.")
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_learning_rates_follow_maes_formula() -> None:
    cfg = load_config(DIGITS_RECIPE, ["model.size=tiny", "model.patch_size=4", "optim.warmup_steps=0"])
    method = build_method(cfg)
    apply_activation_checkpointing(method)  # names gain wrapper segments; the scales must not change
    peak, decay, depth = 1e-3, cfg.method.finetune.layer_decay, 12
    optimizer = build_optimizer(method, cfg.optim, peak, method.no_weight_decay(), method.lr_scale)
    scheduler = build_scheduler(optimizer, cfg.optim, 10, peak)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = {}
    for name, param in method.named_parameters():
        if not param.requires_grad:
            continue
        clean = name.replace("._checkpoint_wrapped_module", "")
        names[clean] = param
        group = group_of[id(param)]
        expected = peak * decay ** (depth + 1 - mae_layer_id(clean, depth))
        assert group["lr"] == pytest.approx(expected, rel=1e-12), clean
        no_decay = param.ndim <= 1 or clean.endswith(("cls_token", "pos_embed"))
        assert group["weight_decay"] == (0.0 if no_decay else cfg.optim.weight_decay), clean
    assert "classifier.backbone.blocks.11.attn.qkv.weight" in names and "classifier.fc_norm.weight" in names
    assert "classifier.backbone.norm.weight" not in names  # fc_norm replaced the encoder's final norm
    assert len({round(g["lr_scale"], 12) for g in optimizer.param_groups}) == depth + 2
    for _ in range(4):  # the schedule scales every group alike
        optimizer.step()
        scheduler.step()
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(scheduler.get_last_lr()[0] * group["lr_scale"], rel=1e-12)


def test_drop_path_drops_whole_samples_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    drop = DropPath(0.25)
    out = drop(torch.ones(4000, 3, 2))
    kept = out.flatten(1)
    assert kept.unique().tolist() == pytest.approx([0.0, 1 / 0.75])
    assert torch.all(kept.amin(1) == kept.amax(1))  # a whole sample at a time
    assert (kept[:, 0] == 0).float().mean().item() == pytest.approx(0.25, abs=0.03)
    assert torch.equal(drop.eval()(torch.ones(5, 3)), torch.ones(5, 3))
    vit = build_vit("tiny", img_size=8, patch_size=4, drop_path_rate=0.2)
    rates = [block.drop_path.p if isinstance(block.drop_path, DropPath) else 0.0 for block in vit.blocks]
    assert rates == pytest.approx(torch.linspace(0, 0.2, 12).tolist())  # timm's rule
    with pytest.raises(ValueError, match="drop path"):
        DropPath(1.0)


def test_activation_checkpointing_replays_the_dropped_samples() -> None:
    """The recompute in backward must drop the samples the forward dropped, or the gradients are wrong."""

    class Holder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block(16, 2, drop_path=0.5)])

        def transformer_blocks(self):
            return [self.blocks]

    torch.manual_seed(0)
    plain = Holder()
    wrapped = Holder()
    wrapped.load_state_dict(plain.state_dict())
    apply_activation_checkpointing(wrapped)
    grads = []
    for model in (plain, wrapped):
        x = torch.randn(16, 3, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)
        model.blocks[0](x).square().sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1])


def test_label_subsets_are_class_balanced_nested_and_reproducible() -> None:
    labels = {f"a{i}": 0 for i in range(100)} | {f"b{i}": 1 for i in range(50)} | {f"c{i}": 2 for i in range(7)}
    tenth = class_balanced_subset(labels, 0.1, seed=0)
    assert tenth.per_class == {0: 10, 1: 5, 2: 1}  # max(1, round(fraction x class size))
    assert sum(labels[k] == c for k in tenth.keys for c in [0]) == 10
    assert class_balanced_subset(labels, 0.1, seed=0).keys == tenth.keys
    assert class_balanced_subset(dict(reversed(labels.items())), 0.1, seed=0).keys == tenth.keys  # order-free
    assert class_balanced_subset(labels, 0.1, seed=1).keys != tenth.keys
    assert tenth.keys < class_balanced_subset(labels, 0.3, seed=0).keys
    assert class_balanced_subset(labels, 1.0, seed=0).keys == frozenset(labels)
    record = tenth.record()
    assert record["num_samples"] == 16 and record["sha256"] == tenth.digest and record["keys"] == sorted(tenth.keys)
    with pytest.raises(ValueError, match="label fraction"):
        class_balanced_subset(labels, 0.0, seed=0)


def test_the_loader_reads_exactly_the_subset(digit_shards) -> None:
    labels, failed = scan_labels(str(digit_shards), "train")
    assert failed == 0 and len(labels) == Manifest.load(digit_shards).num_samples("train")
    subset = class_balanced_subset(labels, 0.1, seed=3)
    assert len(subset.per_class) == 10
    loader = ResumableLoader(
        str(digit_shards), batch_size=16, transform=eval_transform(16), infinite=False, subset=subset, seed=3
    )
    seen = [(key, int(label)) for batch in loader for key, label in zip(batch["key"], batch["label"])]
    assert sorted(key for key, _ in seen) == sorted(subset.keys)  # each subset sample once, nothing else
    assert all(labels[key] == label for key, label in seen)
    assert loader.state_dict()["subset"] == subset.digest


def test_bad_input_fails_before_any_work(tmp_path, digit_shards, pretrained) -> None:
    for fraction in (0.0, 1.5):
        with pytest.raises(ConfigError, match=r"data.label_fraction: must be in \(0, 1\]"):
            finetune_config(pretrained, DIGITS_RECIPE, label_fraction=fraction, shards=str(digit_shards))
    cfg = load_config(None, finetune_overrides(tmp_path, digit_shards, pretrained, "method.finetune.num_classes=12"))
    with pytest.raises(ConfigError, match="method.finetune.num_classes: the head has 12 classes, the data .* only 10"):
        Trainer(cfg)
    cfg = load_config(None, finetune_overrides(tmp_path, digit_shards, pretrained, "model.size=small"))
    with pytest.raises(ConfigError, match="model.size: the encoder of .* 'tiny', this config says 'small'"):
        Trainer(cfg)
    # A checkpoint whose trained network is no encoder: the same files, relabelled as a VAE run.
    vae = tmp_path / "vae" / "step_00000001"
    shutil.copytree(pretrained, vae)
    meta = json.loads((vae / "meta.json").read_text())
    meta["config"]["method"]["name"] = "vae"
    (vae / "meta.json").write_text(json.dumps(meta))
    cfg = load_config(None, finetune_overrides(tmp_path, digit_shards, vae))
    with pytest.raises(ConfigError, match="'vae' checkpoint whose trained network is a AutoencoderKL, not a ViT"):
        Trainer(cfg)
    assert not (tmp_path / "ft").exists()  # no run directory was made
    code = main(["eval", "finetune", str(pretrained), "--config", str(DIGITS_RECIPE), "--label-fraction", "0"])
    assert code == 2


def test_a_finetune_starts_from_the_encoder_and_resumes_bit_identically(tmp_path, digit_shards, pretrained) -> None:
    """Every recipe part on (label subset, RandAugment, erasing, mixup/cutmix, drop path, layer decay, EMA):
    stopped after 2 steps and resumed, the run equals a straight one."""
    sets = ["train.steps=4", "data.label_fraction=0.5", "method.finetune.ema_decay=0.9", "data.hflip=0.5"]
    first = Trainer(load_config(None, finetune_overrides(tmp_path / "a", digit_shards, pretrained, *sets)))
    _, encoder, _ = load_encoder_state(pretrained)
    for network in (first.method.classifier, first.method.ema):
        state = network.backbone.state_dict()
        assert state.keys() == {k for k in encoder if not k.startswith("norm.")}
        assert all(torch.equal(state[k], encoder[k]) for k in state)
    assert isinstance(device_transform(first.cfg), Mixup)
    straight = first.fit()
    assert len(straight.losses) == 4 and all(math.isfinite(x) for x in straight.losses)
    record = json.loads((tmp_path / "a" / "ft" / "label_subset.json").read_text())
    assert record["fraction"] == 0.5 and record["num_samples"] == len(first.loader.subset.keys)

    again = finetune_overrides(tmp_path / "b", digit_shards, pretrained, *sets)
    Trainer(load_config(None, again)).fit(until=2)
    resumed = Trainer(load_config(None, again))
    result = resumed.fit()
    assert result.losses == straight.losses[2:]
    assert_equal_states(resumed.method.state_dict(), first.method.state_dict())
    assert not torch.equal(first.method.ema.head.weight, first.method.classifier.head.weight)


def test_mixed_batches_train_on_soft_targets() -> None:
    mixing = ["method.finetune.mixup=0.8", "method.finetune.cutmix=1.0"]
    cfg = load_config(DIGITS_RECIPE, ["model.size=tiny", "model.patch_size=4", "data.image_size=8", *mixing])
    method = build_method(cfg).eval()  # no drop path: the two forwards below see the same network
    torch.manual_seed(0)
    batch = {"image": torch.randn(4, 3, 8, 8), "label": torch.tensor([0, 1, 2, 3])}
    mixed = device_transform(cfg)(batch)
    loss = method(mixed)["loss"]
    direct = soft_target_cross_entropy(method.classifier(mixed["image"]), mixed["target"])
    assert loss.item() == pytest.approx(direct.item())
    assert not torch.equal(mixed["image"], batch["image"]) and mixed["target"].shape == (4, 10)
    assert device_transform(load_config(DIGITS_RECIPE, ["model.size=tiny", "model.patch_size=4"])) is None


def test_eval_finetune_links_the_runs_and_logs_top1_on_both(tmp_path, digit_shards, pretrained) -> None:
    from mlflow.tracking import MlflowClient

    sets = [*SMALL, "train.steps=2", f'run.output_dir="{tmp_path}"']
    report = evaluate_finetune(pretrained, DIGITS_RECIPE, label_fraction=0.1, shards=str(digit_shards), overrides=sets)
    assert 0 <= report["finetune_top1"] <= 1 and report["num_test"] == Manifest.load(digit_shards).num_samples("test")
    assert Path(report["checkpoint"]).parent.parent.name == "mae-finetune-10pct"
    pre_meta = json.loads((pretrained / "meta.json").read_text())
    run_file = json.loads((pretrained.parent.parent / "tracking" / "run.json").read_text())
    client = MlflowClient(run_file["tracking_uri"])  # the fine-tune is in the pretraining run's store
    ft_run = client.get_run(report["mlflow_run_id"])
    pre_run_id = pre_meta["mlflow_run_id"] or run_file["run_id"]
    assert ft_run.data.tags["pretrained_run_id"] == pre_run_id
    assert ft_run.data.metrics["test_top1"] == pytest.approx(report["finetune_top1"])
    pre_run = client.get_run(pre_run_id)
    assert pre_run.data.metrics["finetune_top1_10pct"] == pytest.approx(report["finetune_top1"])


@pytest.mark.slow
@pytest.mark.parametrize("case", [case for case in CASES if case.startswith("finetune-")])
def test_two_ranks_match_one_process(engine_runs, case) -> None:
    """Same global batch, same steps: losses, parameters (learning rates per layer) and the EMA agree."""
    state = check_case(engine_runs, case)
    assert not torch.equal(state["ema.head.weight"], state["classifier.head.weight"])


@pytest.mark.slow
def test_fsdp_meta_init_loads_the_encoder_into_the_shards(tmp_path, digit_shards, pretrained) -> None:
    """Built on the meta device and materialized shard by shard, the fine-tune still starts from the encoder (and
    its EMA too): after one step at a negligible rate, the saved weights are the pretrained ones."""
    from pretrain.ckpt.load import load_method

    from test_engines import torchrun

    sets = finetune_overrides(
        tmp_path, digit_shards, pretrained, "engine.kind=fsdp", "engine.fsdp.meta_init=true", "run.device=cpu",
        "train.steps=1", "optim.base_lr=1e-12", "optim.min_lr=0", "optim.weight_decay=0", "method.finetune.ema_decay=0.5",
    )  # fmt: skip
    args = ["-m", "pretrain.cli", "train", str(DIGITS_RECIPE), *[a for s in sets for a in ("--set", s)]]
    torchrun(2, args)
    _, method, _ = load_method(tmp_path / "ft")
    _, encoder, _ = load_encoder_state(pretrained)
    for network in (method.classifier, method.ema):
        for name, tensor in network.backbone.state_dict().items():
            torch.testing.assert_close(tensor, encoder[name], rtol=0, atol=1e-6, msg=name)
    lines = [json.loads(line) for line in (tmp_path / "ft" / "metrics.jsonl").read_text().splitlines()]
    assert any("test_top1" in line for line in lines)  # both ranks scored the test split at the end
