"""DiT method end to end on CPU: the loss it trains, its EMA, exact resume with the EMA, sample grids."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image

from pretrain.checkpoint import read_meta
from pretrain.cli import main
from pretrain.config import ConfigError
from pretrain.diffusion.flow import flow_matching_loss, interpolate, logit_normal_timesteps
from pretrain.methods.registry import build_method
from pretrain.recipes import load_config
from pretrain.sample import sample_grid
from pretrain.train import Trainer

from tiny import assert_equal_states


def dit_overrides(out: Path, shards: Path, *extra: str) -> list[str]:
    """A 2-block DiT of width 32 on 16 px one-channel digits, 4x4 patches: seconds per run."""
    return [
        f'run.output_dir="{out}"',
        "run.name=tiny_dit",
        f'data.shards="{shards}"',
        "data.image_size=16",
        "data.batch_size=8",
        "data.num_workers=0",
        "data.shuffle_buffer=50",
        "data.pin_memory=false",
        "data.hflip=0.0",
        "data.crop_scale=[1.0, 1.0]",
        "method.name=dit",
        "method.dit.space=pixel",
        "method.dit.in_channels=1",
        "method.dit.input_size=16",
        "method.dit.patch_size=4",
        "method.dit.hidden_dim=32",
        "method.dit.depth=2",
        "method.dit.num_heads=2",
        "method.dit.num_classes=10",
        "method.dit.ema_momentum=0.9",
        "method.dit.sample_steps=2",
        "optim.base_lr=1e-3",
        "optim.lr_scaling=none",
        "optim.weight_decay=0.0",
        "optim.warmup_steps=2",
        "optim.grad_clip=1.0",
        "train.steps=6",
        "train.log_every=1",
        "train.ckpt_every=0",
        "tracking.enabled=false",
        *extra,
    ]


def dit_config(out: Path, shards: Path, *extra: str):
    return load_config(None, dit_overrides(out, shards, *extra))


def test_method_loss_is_rectified_flow_on_its_own_draws(tmp_path, digit_shards):
    method = build_method(dit_config(tmp_path, digit_shards)).eval()  # eval: no label dropout
    for p in method.model.parameters():  # leave the zero init so predictions are not trivially 0
        p.data.add_(0.02 * torch.randn_like(p))
    x, labels = torch.randn(4, 1, 16, 16), torch.tensor([0, 3, 5, 9])
    torch.manual_seed(7)
    loss = method({"image": x, "label": labels})["loss"]
    torch.manual_seed(7)
    noise = torch.randn_like(x)
    t = logit_normal_timesteps(4)
    expected = flow_matching_loss(method.model(interpolate(x, noise, t), t, labels), x, noise)
    assert torch.equal(loss, expected)


def test_ema_is_a_frozen_twin_outside_the_optimizer(tmp_path, digit_shards):
    trainer = Trainer(dit_config(tmp_path, digit_shards))
    method = trainer.method
    assert all(not p.requires_grad for p in method.ema.parameters())
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in method.model.parameters()}
    assert method.ema.blocks in method.transformer_blocks() and method.model.blocks in method.transformer_blocks()
    assert method.ema_pairs() == [(method.ema, method.model)]
    assert_equal_states(method.ema.state_dict(), method.model.state_dict())  # starts equal
    assert method.ema_momentum(1, 100) == 0.9  # no warmup configured
    method.ema_warmup = True
    assert method.ema_momentum(1, 100) == pytest.approx(2 / 11)


def test_interrupted_and_resumed_dit_run_is_bit_identical(tmp_path, digit_shards):
    """6 steps straight == 3 steps + resume + 3 steps, EMA weights included; the EMA moved."""
    straight = Trainer(dit_config(tmp_path / "straight", digit_shards))
    initial = copy.deepcopy(straight.method.state_dict())
    full = straight.fit()

    cfg = dit_config(tmp_path / "split", digit_shards)
    first = Trainer(cfg).fit(until=3)
    assert read_meta(first.checkpoint)["step"] == 3
    resumed = Trainer(cfg)
    assert resumed.step == 3
    second = resumed.fit()
    assert first.losses + second.losses == full.losses

    final = copy.deepcopy(straight.method.state_dict())
    resumed_state = resumed.method.state_dict()
    assert_equal_states(resumed_state, final, "model")
    assert_equal_states(resumed.optimizer.state_dict(), straight.optimizer.state_dict(), "optim")
    ema_keys = [k for k in final if k.startswith("ema.") and not k.endswith("pos_embed")]
    assert ema_keys and "latent_scale" in final
    # The EMA followed the online weights without equalling them or staying at the start.
    moved = [k for k in ema_keys if not torch.equal(final[k], initial[k])]
    assert moved and any(not torch.equal(final[k], final["model." + k[4:]]) for k in moved)


def test_sample_grid_and_training_visuals(tmp_path, digit_shards):
    result = Trainer(dit_config(tmp_path, digit_shards, "train.steps=2")).fit()
    grid, how = sample_grid(result.checkpoint, label=3, num=4, steps=2, cfg_scale=2.0, sampler="heun")
    assert how == "heun, 2 steps, guidance scale s=2"
    assert grid.dtype == torch.uint8 and grid.shape == (2 + 2 * 18, 2 + 2 * 18, 3)
    png = tmp_path / "grid.png"
    args = ["sample", "--checkpoint", str(tmp_path / "tiny_dit"), "--class", "3", "--num", "9", "--steps", "2"]
    assert main([*args, "--out", str(png)]) == 0
    assert Image.open(png).size == (2 + 3 * 18, 2 + 3 * 18)
    method = build_method(dit_config(tmp_path, digit_shards)).eval()
    pictures = method.visuals({})
    assert pictures["samples"].shape == (2 + 2 * 18, 2 + 10 * 18, 3)
    assert torch.equal(method.visuals({})["samples"], pictures["samples"])  # fixed noise across calls


@pytest.mark.parametrize(
    "override,key",
    [
        ("method.dit.input_size=15", "method.dit.input_size"),
        ("method.dit.size=XXL", "method.dit.size"),
        ("method.dit.class_dropout=1.0", "method.dit.class_dropout"),
        ("method.dit.in_channels=4", "method.dit.in_channels"),
    ],
)
def test_bad_dit_settings_name_the_key(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(None, ["method.name=dit", "method.dit.space=pixel", "method.dit.in_channels=1", override])


def test_latent_space_without_a_latent_manifest_fails_naming_the_key(tmp_path, digit_shards):
    cfg = dit_config(tmp_path, digit_shards, "method.dit.space=latent", "method.dit.in_channels=4")
    with pytest.raises(ConfigError, match="method.dit.latent_scale"):
        Trainer(cfg)


def test_meta_device_build_initializes_model_ema_and_scale(tmp_path, digit_shards):
    """What FSDP's meta_init does: build without memory, allocate, then `init_weights`."""
    cfg = dit_config(tmp_path, digit_shards)
    with torch.device("meta"):
        method = build_method(cfg)
    method.to_empty(device="cpu")
    method.init_weights()
    assert method.latent_scale.item() == 1.0
    assert_equal_states(method.ema.state_dict(), method.model.state_dict())
    assert torch.equal(method.ema.pos_embed, build_method(cfg).ema.pos_embed)


def _trained_away_from_zero(method) -> None:
    """adaLN-Zero starts at zero output; random output layers make the guidance terms differ."""
    torch.manual_seed(1)
    with torch.no_grad():
        for net in (method.model, method.ema):
            for block in net.blocks:
                block.adaLN_modulation[-1].weight.normal_(std=0.05)
            net.final_layer.linear.weight.normal_(std=0.05)


def test_guidance_scale_is_the_papers(tmp_path, digit_shards):
    """s = 1 samples the conditional model alone; s follows v_uncond + s (v_cond - v_uncond)."""
    from pretrain.diffusion.sampling import sample

    method = build_method(dit_config(tmp_path, digit_shards)).eval()
    _trained_away_from_zero(method)
    labels, ema = torch.tensor([1, 3]), method.ema

    def run(scale, velocity=None):
        noise = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
        if velocity is None:
            return method.generate(labels, 3, scale, "euler", torch.Generator().manual_seed(0))
        return sample(velocity, noise, 3, "euler", method.t_shift)

    unguided = run(None, lambda x, t: ema(x, t, labels))
    assert torch.allclose(run(1.0), unguided, atol=1e-6)
    null = torch.full_like(labels, ema.null_class)
    paper = run(None, lambda x, t: ema(x, t, null) + 2.5 * (ema(x, t, labels) - ema(x, t, null)))
    assert torch.allclose(run(2.5), paper, atol=1e-5)
    assert not torch.allclose(run(2.5), unguided, atol=1e-3)


def test_cli_cfg_scale_one_equals_unguided_sampling(tmp_path, digit_shards):
    result = Trainer(dit_config(tmp_path, digit_shards, "train.steps=2")).fit()
    grid, _ = sample_grid(result.checkpoint, label=3, num=4, steps=2, cfg_scale=1.0)
    from pretrain.ckpt.load import load_method

    _, method, _ = load_method(result.checkpoint)
    labels, generator = torch.full((4,), 3), torch.Generator().manual_seed(0)
    from pretrain.diffusion.sampling import sample
    from pretrain.visualize import image_grid

    noise = torch.randn(4, 1, 16, 16, generator=generator)
    unguided = sample(lambda x, t: method.ema(x, t, labels), noise, 2, "euler", method.t_shift)
    assert torch.equal(grid, image_grid(method.decode(unguided), nrow=2))
    png = tmp_path / "s1.png"
    args = ["sample", "--checkpoint", str(result.checkpoint), "--class", "3", "--num", "4", "--steps", "2"]
    assert main([*args, "--cfg-scale", "1", "--out", str(png)]) == 0
    assert torch.equal(torch.from_numpy(__import__("numpy").array(Image.open(png))), grid)


def test_checkpoint_from_before_the_paper_convention_reads_w_as_s(tmp_path, digit_shards):
    """A saved config without method.dit.sample_guided_channels stored w; it loads as s = w + 1."""
    import json

    from pretrain.ckpt.load import load_method

    result = Trainer(dit_config(tmp_path, digit_shards, "train.steps=2", "method.dit.sample_cfg_scale=5.0")).fit()
    meta_file = result.checkpoint / "meta.json"
    meta = json.loads(meta_file.read_text())
    del meta["config"]["method"]["dit"]["sample_guided_channels"]
    meta["config"]["method"]["dit"]["sample_cfg_scale"] = 4.0  # the old configs' w = 4
    meta_file.write_text(json.dumps(meta))
    cfg, method, _ = load_method(result.checkpoint)
    assert cfg.method.dit.sample_cfg_scale == 5.0 and method.sample_cfg_scale == 5.0
    # Resuming with today's recipe at s = 5 is no change of the network settings.
    cfg = dit_config(tmp_path, digit_shards, "train.steps=3", "method.dit.sample_cfg_scale=5.0")
    assert Trainer(cfg).fit().checkpoint.name.endswith("3")


def test_guided_channels_beyond_the_input_fail_naming_the_key(tmp_path, digit_shards):
    with pytest.raises(ConfigError, match="method.dit.sample_guided_channels"):
        dit_config(tmp_path, digit_shards, "method.dit.sample_guided_channels=3")
