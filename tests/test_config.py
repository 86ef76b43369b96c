"""Config loading: every shipped config is valid, and bad input fails naming the key."""

from pathlib import Path

import pytest

from pretrain.config import Config, ConfigError, parse_override
from pretrain.recipes import load_config

CONFIGS = sorted(Path(__file__).parents[1].joinpath("configs").glob("*.toml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_shipped_configs_exist():
    names = {p.name for p in CONFIGS}
    assert {"mae_vit_tiny_digits.toml", "mae_vit_b16.toml"} <= names


def test_overrides_are_typed_and_applied():
    cfg = load_config(None, ["optim.base_lr=3e-4", "data.batch_size=32", "run.name=abc", "data.crop_scale=[0.3, 1.0]"])
    assert cfg.optim.base_lr == 3e-4
    assert cfg.data.batch_size == 32
    assert cfg.run.name == "abc"
    assert cfg.data.crop_scale == (0.3, 1.0)


def test_int_is_accepted_for_float():
    assert load_config(None, ["optim.base_lr=1"]).optim.base_lr == 1.0


def test_parse_override_bare_word_is_string():
    assert parse_override("train.resume=auto") == (["train", "resume"], "auto")
    assert parse_override("train.resume=/a/b c") == (["train", "resume"], "/a/b c")


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1e-3", "unknown key 'optim.lrr'"),
        ("optimizer.lr=1e-3", "unknown key 'optimizer'"),
        ("data.batch_size=abc", "data.batch_size: expected int, got str"),
        ("data.batch_size=1.5", "data.batch_size: expected int"),
        ("train.vis_every=true", "train.vis_every: expected int, got bool"),
        ("data.crop_scale=[0.2]", "data.crop_scale: expected a list of 2 values"),
        ("data.image_size=30", "data.image_size: 30 is not a multiple of model.patch_size 16"),
        ("method.mae.mask_ratio=1.0", "method.mae.mask_ratio"),
        ("method.name=byol", "method.name: 'byol' is not one of"),
        ("model.size=gigantic", "model.size: 'gigantic' is not one of"),
        ("model.attn_backend=flash9", "model.attn_backend"),
        ("engine.kind=mpi", "engine.kind"),
        ("engine.deepspeed.zero_stage=4", "engine.deepspeed.zero_stage: 4 is not one of 1, 2, 3"),
        ("engine.fsdp.meta_init=true", "engine.fsdp.meta_init: only the fsdp engine reads it"),
        ("data.batch_size=0", "data.batch_size: must be > 0"),
        ("optim.warmup_steps=5000", "optim.warmup_steps: 5000 exceeds train.steps 1000"),
        ("method.mae.decoder_dim=100", "method.mae.decoder_dim: 100 is not divisible"),
        ("data=3", "data: expected a section"),
        ("lr", "not of the form key=value"),
    ],
)
def test_bad_config_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(None, [override])


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'optim.base_lr'"):
        load_config(None, ["optim.base_lrr=1e-3"])


def test_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim\nlr = 1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)
    typo = tmp_path / "typo.toml"
    typo.write_text("[train]\nstep = 10\n")
    with pytest.raises(ConfigError, match="unknown key 'train.step'"):
        load_config(typo)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["method.name=moco", "data.local_crops=4"], "data.local_crops: MoCo v3 uses exactly two views"),
        (["method.name=moco", "method.moco.temperature=0"], "method.moco.temperature: must be > 0"),
        (["method.name=moco", "method.moco.infonce_impl=fast"], "method.moco.infonce_impl: 'fast' is not one of"),
        (["method.name=dino", "method.dino.center_momentum=1.0"], "method.dino.center_momentum: must be in [0, 1)"),
        (["method.name=dino", "method.dino.momentum=1.5"], "method.dino.momentum: must be in [0, 1]"),
        (["method.name=dino", "data.local_crops=2", "data.local_crop_size=90"], "data.local_crop_size: 90 is not"),
        (["data.grayscale_prob=1.2"], "data.grayscale_prob: must be in [0, 1]"),
        (["data.blur_prob=[1.0, 2.0]"], "data.blur_prob: each value must be in [0, 1]"),
        (["data.color_augment_on=gpu"], "data.color_augment_on: 'gpu' is not one of device, workers"),
        (["eval.linear_val_fraction=1.0"], "eval.linear_val_fraction: must be in (0, 1)"),
    ],
)
def test_bad_ssl_settings_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.precision=fp16", "train.precision: 'fp16' is not one of auto, fp32, bf16"),
        ("run.device=tpu", "run.device: 'tpu' is not one of auto, cpu, cuda"),
        ("engine.deepspeed.zero_stage=true", "engine.deepspeed.zero_stage: True is not one of 1, 2, 3"),
        ("optim.betas=[0.9, 1.0]", "optim.betas: each value must be in [0, 1)"),
        ("tracking.flush_interval=0", "tracking.flush_interval: must be > 0"),
        ("method.dit.class_dropout=1.0", "method.dit.class_dropout: must be in [0, 1)"),
    ],
)
def test_literal_choices_and_bounds_name_the_key(override, message):
    """Choices come from `Literal` annotations and bounds from field metadata, in every section."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        load_config(None, [override])


def test_bounds_are_checked_on_defaults_of_a_section_too():
    """A section built without the bounded key still gets the check (a bad default would fail loudly)."""
    import dataclasses

    from pretrain.config import bounded, build_section

    @dataclasses.dataclass
    class Section:
        ratio: float = bounded(1.5, ge=0, le=1)

    with pytest.raises(ConfigError, match=r"x.ratio: must be in \[0, 1\], got 1.5"):
        build_section(Section, {}, "x.")
    assert build_section(Section, {"ratio": 0.5}, "x.").ratio == 0.5


def test_options_of_an_engine_that_is_not_running_fail():
    with pytest.raises(ConfigError, match="engine.deepspeed.zero_stage: only the deepspeed engine reads it"):
        load_config(None, ["engine.kind=fsdp", "engine.deepspeed.zero_stage=3"])
    assert (
        load_config(None, ["engine.kind=deepspeed", "engine.deepspeed.zero_stage=3"]).engine.deepspeed.zero_stage == 3
    )


def test_checkpoint_configs_with_moved_engine_keys_still_load():
    """Configs saved before the engine options moved into engine.<kind> sections load with the same values."""
    from pretrain.recipes import config_from_dict, default_config

    saved = default_config().to_dict()
    saved["engine"] = {"kind": "deepspeed", "zero_stage": 3, "activation_checkpointing": True, "compile": False}
    cfg = config_from_dict(saved)
    assert cfg.engine.deepspeed.zero_stage == 3 and cfg.engine.activation_checkpointing
    saved["engine"] = {"kind": "fsdp", "meta_init": True, "reshard_after_forward": False}
    cfg = config_from_dict(saved)
    assert cfg.engine.fsdp.meta_init and not cfg.engine.fsdp.reshard_after_forward


def test_every_method_and_engine_has_a_section_and_round_trips():
    from pretrain.engines import ENGINES
    from pretrain.methods.registry import METHODS
    from pretrain.recipes import config_from_dict, default_config

    cfg = default_config()
    for name in METHODS:
        assert dataclasses_is_instance(getattr(cfg.method, name), METHODS[name].config)
    for name, engine in ENGINES.items():
        if engine.options is not None:
            assert dataclasses_is_instance(getattr(cfg.engine, name), engine.options)
    assert config_from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()


def dataclasses_is_instance(value, cls) -> bool:
    return type(value) is cls
