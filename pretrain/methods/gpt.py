"""Class-conditional autoregressive transformer over VQ tokens: the second stage of VQGAN (Esser et al. 2021) and
LlamaGen (Sun et al. 2024). It trains on token shards (`pretrain data tokens`) with next-token cross-entropy,
the class as a prefix token that is replaced by a null class with probability `class_dropout`, so the same
network gives the unconditional logits of classifier-free guidance (pretrain/models/gpt.py).

Samples are token grids; a VQ tokenizer (`method.gpt.tokenizer`, a `vq` run) decodes them into the pictures
that go to MLflow and that `pretrain sample` writes. The loss is in nats per token; `bits_per_token` is the
same number in bits (log2 of the vocabulary for a uniform model).

Differences from the released code, all deliberate: the network is GPT-2's (LayerNorm, GELU MLP, learned
positions), which is VQGAN's transformer, not LlamaGen's Llama (RMSNorm, SwiGLU, 2-D RoPE); there is no
dropout (LlamaGen uses 0.1 on tokens, residuals and the MLP; VQGAN's minGPT 0.0 to 0.1), so runs at any world
size draw the same numbers; and token shards hold one tokenization per image, without LlamaGen's ten-crop
augmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from data_pipeline.decode import DecodeError
from data_pipeline.manifest import Manifest
from pretrain.activation_memory import STAT, blocks_bytes, layer_norm_bytes, vit_block
from pretrain.config import Config, ConfigError, bounded, check_choice
from pretrain.diffusion.transforms import to_unit
from pretrain.flops import FlopCount, block_flops, linear_flops
from pretrain.methods.base import Method
from pretrain.methods.finetune import data_classes
from pretrain.methods.spec import MethodSpec
from pretrain.methods.vq import load_tokenizer, tokenizer_settings
from pretrain.models.gpt import GPT2_SIZES, TokenGPT
from pretrain.visualize import image_grid


@dataclass
class GPTConfig:
    """method.gpt: the transformer, the token data it models, and how pictures are sampled."""

    # small | medium | large | xl: GPT-2's sizes (pretrain/models/gpt.py: GPT2_SIZES).
    size: str = "medium"
    # Nonzero: override the size's width, depth or heads (small CPU models).
    hidden_dim: int = bounded(0, ge=0)
    depth: int = bounded(0, ge=0)
    num_heads: int = bounded(0, ge=0)
    mlp_ratio: float = bounded(4.0, gt=0)
    # The tokenizer's codebook size and token grid side (f16 at 256 px: 16); checked against the token
    # manifest of data.shards before any work.
    vocab_size: int = bounded(1024, gt=0)
    token_grid: int = bounded(16, gt=0)
    num_classes: int = bounded(1000, gt=0)
    # Probability that a label is replaced by the null class (for guidance); LlamaGen: 0.1.
    class_dropout: float = bounded(0.1, ge=0, le=1)
    # A vq run or checkpoint that decodes sampled tokens into pictures; "": no pictures (the data's manifest
    # names the tokenizer it was made with).
    tokenizer: str = ""
    # Sampling, for the pictures and `pretrain sample`'s defaults. Guidance scale s of the paper convention:
    # logits = uncond + s (cond - uncond), 1 = no guidance. top_k 0 and top_p 1 keep every token.
    sample_temperature: float = bounded(1.0, gt=0)
    sample_top_k: int = bounded(0, ge=0)
    sample_top_p: float = bounded(1.0, gt=0, le=1)
    sample_cfg_scale: float = bounded(1.0, ge=0)
    # Pictures: samples per class (the first 10 classes), every train.vis_every steps.
    vis_samples: int = bounded(2, ge=1)


class TokenAutoregressive(Method):
    """Next-token cross-entropy of `model` on token grids [B, h, w] (flattened in raster order)."""

    def __init__(
        self,
        model: TokenGPT,
        tokenizer_path: str = "",
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        vis_samples: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer_path = tokenizer_path
        self.temperature, self.top_k, self.top_p, self.cfg_scale = temperature, top_k, top_p, cfg_scale
        self.vis_samples, self.seed = vis_samples, seed
        self.__dict__["_tokenizer"] = None  # not a submodule: never trained, saved or sharded with the model

    @torch.no_grad()
    def init_weights(self) -> None:
        self.model.init_weights()

    def inference_network(self) -> TokenGPT:
        return self.model

    def transformer_blocks(self) -> list[nn.ModuleList]:
        return [self.model.blocks]

    def no_weight_decay(self) -> set[str]:
        return {"model.pos_embed"}

    def tokens_of(self, batch: dict[str, Tensor]) -> Tensor:
        tokens = batch["image"]
        if not isinstance(tokens, Tensor) or tokens.is_floating_point():
            raise ValueError("the token transformer needs batch['image'] as integer token grids (token shards)")
        return tokens.flatten(1)

    def forward(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        tokens = self.tokens_of(batch)
        labels = self.model.drop_labels(batch["label"], None)  # the loop's RNG: checkpointed, so resumes repeat it
        loss = self.model.loss(tokens, labels)
        return {"loss": loss, "bits_per_token": loss.detach() / math.log(2)}

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        generator: torch.Generator | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float | None = None,
        use_cache: bool = True,
    ) -> Tensor:
        """Token grids [B, h, w] for `labels`; unset options take the configured sampling settings."""
        was_training = self.model.training
        self.model.eval()
        try:
            tokens = self.model.generate(
                labels,
                generator,
                temperature=self.temperature if temperature is None else temperature,
                top_k=self.top_k if top_k is None else top_k,
                top_p=self.top_p if top_p is None else top_p,
                cfg_scale=self.cfg_scale if cfg_scale is None else cfg_scale,
                use_cache=use_cache,
            )
        finally:
            self.model.train(was_training)
        side = math.isqrt(self.model.seq_len)
        return tokens.view(-1, side, side)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """Token grids [B, h, w] -> pictures in [0, 1], through the tokenizer (loaded on first use)."""
        if not self.tokenizer_path:
            raise ValueError("method.gpt.tokenizer is not set: no VQ tokenizer to decode tokens into pictures")
        if self._tokenizer is None:
            self.__dict__["_tokenizer"] = load_tokenizer(self.tokenizer_path)
        tokenizer = self._tokenizer.to(tokens.device)
        return to_unit(tokenizer.decode_indices(tokens).float())

    @torch.no_grad()
    def visuals(self, batch: dict[str, Tensor]) -> dict[str, Tensor]:
        """`vis_samples` rows of samples, one column per class (the first 10), from a fixed seed so the same
        cells compare across steps; nothing without a tokenizer to decode them."""
        if not self.tokenizer_path:
            return {}
        device = batch["image"].device
        columns = min(self.model.num_classes, 10)
        labels = torch.arange(columns, device=device).repeat(self.vis_samples)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        images = self.decode(self.generate(labels, generator))
        return {"samples": image_grid(images, nrow=columns)}


# ---------------------------------------------------------------------- the method's spec


def dims(g) -> tuple[int, int, int]:
    """(width, depth, heads) after the overrides."""
    width, depth, heads = GPT2_SIZES[g.size]
    return g.hidden_dim or width, g.depth or depth, g.num_heads or heads


def validate(cfg: Config) -> None:
    g = cfg.method.gpt
    check_choice("method.gpt.size", g.size, GPT2_SIZES)
    width, _, heads = dims(g)
    if width % heads:
        raise ConfigError(f"method.gpt.hidden_dim: {width} is not divisible by method.gpt.num_heads {heads}")


def preflight(cfg: Config) -> None:
    """The token data and the tokenizer agree with the network: codebook size, grid and classes."""
    g = cfg.method.gpt
    if g.tokenizer:
        try:
            vq = tokenizer_settings(g.tokenizer)
        except (FileNotFoundError, ValueError) as exc:
            raise ConfigError(f"method.gpt.tokenizer: {exc}") from exc
        if vq.num_codes != g.vocab_size:
            raise ConfigError(
                f"method.gpt.vocab_size: {g.vocab_size}, but the tokenizer {g.tokenizer} has {vq.num_codes} codes"
            )
    if not cfg.data.shards:
        return
    try:
        manifest = Manifest.load(cfg.data.shards)
    except (FileNotFoundError, ValueError, NotADirectoryError):
        return  # brace patterns and URLs have no manifest: the transform checks each record
    tokens = manifest.tokens
    if tokens is None:
        raise ConfigError(
            f"data.shards: {cfg.data.shards} holds no token manifest; write token shards with `pretrain data tokens`"
        )
    if tokens["num_codes"] != g.vocab_size:
        raise ConfigError(
            f"method.gpt.vocab_size: {g.vocab_size}, but the tokens at {cfg.data.shards} have {tokens['num_codes']} codes"
        )
    if tokens["size"] != g.token_grid:
        raise ConfigError(
            f"method.gpt.token_grid: {g.token_grid}, but the tokens at {cfg.data.shards} are "
            f"{tokens['size']}x{tokens['size']} grids"
        )
    classes = data_classes(cfg.data.shards)
    if classes is not None and classes > g.num_classes:
        raise ConfigError(
            f"method.gpt.num_classes: {g.num_classes} classes, the data at {cfg.data.shards} has {classes}"
        )


def build(cfg: Config) -> TokenAutoregressive:
    g = cfg.method.gpt
    width, depth, heads = dims(g)
    model = TokenGPT(
        g.vocab_size,
        g.token_grid**2,
        g.num_classes,
        width,
        depth,
        heads,
        mlp_ratio=g.mlp_ratio,
        attn_backend=cfg.model.attn_backend,
        class_dropout=g.class_dropout,
    )
    return TokenAutoregressive(
        model,
        g.tokenizer,
        g.sample_temperature,
        g.sample_top_k,
        g.sample_top_p,
        g.sample_cfg_scale,
        g.vis_samples,
        cfg.run.seed,
    )


def token_transform(side: int, vocab_size: int):
    """A stored token grid -> long [side, side]. A grid with codes outside the vocabulary is a bad record, skipped
    and counted by the reader; a record that is no token grid at all means the wrong shards, and stops the run."""

    def transform(grid: Tensor, gen: torch.Generator) -> Tensor:
        if not isinstance(grid, Tensor) or grid.is_floating_point():
            raise TypeError("expected a token record (an integer grid): are these image or latent shards?")
        if grid.shape != (side, side):
            raise ValueError(f"token grid {tuple(grid.shape)}, method.gpt.token_grid says {side}x{side}")
        if grid.min() < 0 or grid.max() >= vocab_size:
            raise DecodeError("", f"token values span [{grid.min()}, {grid.max()}], outside [0, {vocab_size})")
        return grid.long()

    return transform


def train_transform(cfg: Config):
    return token_transform(cfg.method.gpt.token_grid, cfg.method.gpt.vocab_size)


def flops(cfg: Config) -> FlopCount:
    """One teacher-forced pass over the token_grid^2 positions: the blocks (attention counted over all pairs,
    as for the encoders, though the causal mask leaves half of them out) and the output head."""
    g = cfg.method.gpt
    width, depth, _ = dims(g)
    positions = g.token_grid**2
    return FlopCount(depth * block_flops(positions, width, g.mlp_ratio) + linear_flops(positions, width, g.vocab_size))


def activations(cfg: Config, act: int, checkpointing: bool) -> dict[str, int]:
    """Per sequence: the pre-norm blocks (the ViT block's count), the embeddings, the final LayerNorm, and the
    logits with the float32 copy and softmax that cross-entropy keeps."""
    g = cfg.method.gpt
    width, depth, heads = dims(g)
    positions = g.token_grid**2
    return {
        "blocks": blocks_bytes(vit_block(positions, width, heads, act), positions * width * act, depth, checkpointing),
        "embeddings": positions * width * act,
        "final norm": layer_norm_bytes(positions, width, act),
        "logits and cross-entropy": positions * g.vocab_size * (act + 2 * STAT),
    }


def synthetic_overrides(cfg: Config) -> list[str]:
    """Synthetic token grids need no tokenizer: it only decodes pictures, which a benchmark does not draw."""
    return ['method.gpt.tokenizer=""'] if cfg.method.gpt.tokenizer else []


SPEC = MethodSpec(
    "gpt",
    GPTConfig,
    build,
    train_transform,
    validate=validate,
    preflight=preflight,
    flops=flops,
    activations=activations,
    synthetic_overrides=synthetic_overrides,
)
