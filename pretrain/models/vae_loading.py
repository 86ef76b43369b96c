"""Load a diffusers-format `AutoencoderKL` directory into our AutoencoderKL. No downloads: it must already be on
disk (config.json + diffusion_pytorch_model.safetensors). Checkpoints of our `vae` method load through
`pretrain.methods.vae.load_vae`, which also takes such a directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from pretrain.models.vae import AutoencoderKL, VAEArch

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
# Checkpoints saved by older diffusers versions name the mid-block attention projections differently.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def is_diffusers_vae(path: str | Path) -> bool:
    path = Path(path)
    return (path / "config.json").is_file() and (path / DIFFUSERS_WEIGHTS).is_file()


def diffusers_arch(config: dict) -> VAEArch:
    """Our architecture record from a diffusers AutoencoderKL config.json; unsupported variants fail by name."""
    for key, expected in [("act_fn", "silu"), ("_class_name", "AutoencoderKL")]:
        if config.get(key, expected) != expected:
            raise ValueError(f"diffusers VAE config: {key}={config[key]!r} is not supported (only {expected!r})")
    for key, expected in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")]:
        if any(kind != expected for kind in config.get(key, [])):
            raise ValueError(f"diffusers VAE config: {key}={config[key]} (only {expected} is supported)")
    return VAEArch(
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
        latent_channels=config.get("latent_channels", 4),
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
        use_quant_conv=config.get("use_quant_conv", True) is not False,
        use_post_quant_conv=config.get("use_post_quant_conv", True) is not False,
    )


def rename_diffusers_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Legacy attention names -> current ones; their 1x1-conv-shaped weights [C, C, 1, 1] -> linear [C, C]."""
    renamed = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if ".attentions." in name and len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION:
            name = ".".join([*parts[:-2], _LEGACY_ATTENTION[parts[-2]], parts[-1]])
            if tensor.dim() == 4:
                tensor = tensor[:, :, 0, 0]
        renamed[name] = tensor
    return renamed


def load_diffusers_vae(directory: str | Path) -> tuple[AutoencoderKL, dict]:
    """(model with the checkpoint's weights, the diffusers config). Every tensor must match a parameter."""
    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text())
    model = AutoencoderKL(diffusers_arch(config))
    state = rename_diffusers_keys(load_file(directory / DIFFUSERS_WEIGHTS))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory}: weights do not match the AutoencoderKL layout of its config.json "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    return model.eval(), config
