"""Class-conditional autoregressive transformer over discrete image tokens: the second stage of VQGAN (Esser
et al. 2021), a GPT-2 over the codebook indices of an image in raster order, conditioned on the class as in
LlamaGen (Sun et al. 2024) by a prefix token.

The sequence the network reads is [class, tok_0 .. tok_{T-2}] and the logits at position t predict tok_t, so
one teacher-forced pass trains every position. The class table has one extra row, the "null" class: training
substitutes it for the label with probability `class_dropout` (`drop_labels`), so one network also gives the
unconditional logits that classifier-free guidance needs.

Generation keeps each layer's keys and values in a `KVCache`, so a new token costs one query over the cached
positions (O(T)) instead of a pass over the whole prefix. Sampling is Gumbel-max with one uniform per logit,
so the generator advances identically whichever way the logits were computed: cached and uncached generation
draw the same tokens for the same seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.models.class_dropout import drop_labels
from pretrain.models.transformer import Attention, Mlp

# GPT-2's sizes (Radford et al. 2019): width, depth, heads. "medium" (350M with a 50k vocabulary) is LlamaGen's
# GPT-L (343M) in width and depth.
GPT2_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (768, 12, 12),
    "medium": (1024, 24, 16),
    "large": (1280, 36, 20),
    "xl": (1600, 48, 25),
}

# ------------------------------------------------------------------------------------- logit filters


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Logits [..., V] with everything below the k-th largest set to -inf. Values tied with the k-th are all
    kept (which to drop among equals would be arbitrary); k <= 0 or k >= V keeps everything."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Nucleus filter (Holtzman et al. 2020): keep the smallest set of most probable tokens whose probability
    mass reaches p, and -inf elsewhere. The most probable token is always kept (so a tiny p is greedy), and
    tokens tied with the least probable kept one are kept too, so the set does not depend on sort order.
    p >= 1 keeps everything."""
    if p >= 1.0:
        return logits
    sorted_logits = logits.sort(dim=-1, descending=True).values
    probs = sorted_logits.float().softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    keep = mass_before < p
    keep[..., 0] = True
    threshold = sorted_logits.masked_fill(~keep, float("inf")).amin(dim=-1, keepdim=True)
    return logits.masked_fill(logits < threshold, float("-inf"))


def cfg_logits(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """Classifier-free guidance on logits, uncond + s (cond - uncond): s = 1 is the conditional model itself
    (returned as is), s > 1 pushes away from the unconditional one."""
    if scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def sample_from_logits(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of logits [..., V], drawn from softmax(logits) by Gumbel-max. Exactly one uniform per
    logit whatever the values, so two samplers that compute the same logits differently stay in step."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float32).tiny)))
    return (logits.float() + gumbel).argmax(dim=-1)


# ------------------------------------------------------------------------------------- the network


class KVCache:
    """One layer's keys and values [B, H, max_len, D] for the positions seen so far. The buffers are allocated on
    the first append, in the dtype the keys come in (autocast decides it), at full length, so a step writes in
    place instead of concatenating."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.length = 0
        self.keys: Tensor | None = None
        self.values: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store k, v [B, H, n, D] after the cached positions; returns the keys and values of all positions so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, appending {k.shape[2]} to {start}")
        if self.keys is None:
            batch, heads, _, head_dim = k.shape
            self.keys = k.new_empty(batch, heads, self.max_len, head_dim)
            self.values = v.new_empty(batch, heads, self.max_len, head_dim)
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class GPTBlock(nn.Module):
    """Pre-LayerNorm GPT-2 block: x + attn(ln(x)), then x + mlp(ln(x)). The unit the engine wraps."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_backend=attn_backend, causal=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.attn(self.norm1(x), cache)
        return x + self.mlp(self.norm2(x))


class TokenGPT(nn.Module):
    """p(tok_0 .. tok_{T-1} | class) for sequences of `seq_len` codebook indices in [0, vocab_size).

    Labels equal to `num_classes` (`null_class`) select the unconditional prefix. `forward` never drops labels:
    the caller draws the dropout with its own generator (`drop_labels`), so the randomness stays explicit. The
    output head is a separate linear (no bias), not tied to the token embedding: the codes are not words, and
    the VQGAN and LlamaGen transformers leave them untied too.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        num_classes: int,
        dim: int,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        attn_backend: str = "sdpa",
        class_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if not 0.0 <= class_dropout <= 1.0:
            raise ValueError(f"class_dropout must be in [0, 1], got {class_dropout}")
        self.vocab_size, self.seq_len, self.num_classes = vocab_size, seq_len, num_classes
        self.depth, self.class_dropout = depth, class_dropout
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.class_embed = nn.Embedding(num_classes + 1, dim)  # last row: the null class
        # position 0 holds the class, position t + 1 holds tok_t; tok_{T-1} is only ever a target
        self.pos_embed = nn.Parameter(torch.zeros(1, seq_len, dim))
        self.blocks = nn.ModuleList(GPTBlock(dim, heads, mlp_ratio, attn_backend) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self.init_weights()

    @property
    def null_class(self) -> int:
        return self.num_classes

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2's init: N(0, 0.02) linears and embeddings, zero biases, unit LayerNorms, and the projections
        that write into the residual stream scaled by 1/sqrt(2 depth), so its variance at the output does not
        grow with depth."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.pos_embed, std=0.02)
        residual_std = 0.02 / math.sqrt(2 * self.depth)
        for block in self.blocks:
            nn.init.normal_(block.attn.proj.weight, std=residual_std)
            nn.init.normal_(block.mlp.fc2.weight, std=residual_std)

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None) -> Tensor:
        """Each label replaced by the null class with probability `class_dropout`, drawn from `generator` (one
        uniform per label; none at rate 0)."""
        return drop_labels(labels, self.class_dropout, self.null_class, generator)

    def embed(self, tokens: Tensor, labels: Tensor | None, start: int = 0) -> Tensor:
        """Input vectors [B, n, D] for positions start.. : the class prefix (when labels are given, only at
        start 0) followed by the embeddings of `tokens` [B, m]."""
        parts = [] if labels is None else [self.class_embed(labels)[:, None]]
        if labels is not None and start != 0:
            raise ValueError(f"the class prefix sits at position 0, not {start}")
        parts.append(self.tok_embed(tokens))
        x = torch.cat(parts, dim=1)
        end = start + x.shape[1]
        if end > self.seq_len:
            raise ValueError(f"positions up to {end} exceed seq_len {self.seq_len} (the prefix takes one)")
        return x + self.pos_embed[:, start:end].to(x.dtype)

    def logits_from_embeddings(self, x: Tensor, caches: list[KVCache] | None = None) -> Tensor:
        """Blocks, final LayerNorm and head on input vectors [B, n, D] -> logits [B, n, V]; with caches (one per
        block), x holds the positions after the cached ones."""
        for index, block in enumerate(self.blocks):
            x = block(x, None if caches is None else caches[index])
        return self.head(self.norm(x))

    def forward(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """tokens [B, T] and labels [B] -> logits [B, T, V]; logits[:, t] predicts tokens[:, t] from the class
        and tokens[:, :t]."""
        return self.logits_from_embeddings(self.embed(tokens[:, :-1], labels))

    def loss(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """Mean next-token cross-entropy (nats per token) of tokens [B, T] given labels [B]."""
        logits = self.forward(tokens, labels)
        return F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten())

    def nll(self, tokens: Tensor, labels: Tensor) -> Tensor:
        """-log p(tokens | label) per sequence [B], in nats: what a likelihood evaluation sums."""
        logits = self.forward(tokens, labels)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), tokens.flatten(), reduction="none")
        return per_token.view(tokens.shape).sum(dim=1)

    def new_cache(self) -> list[KVCache]:
        """Empty per-block caches for one generation; they take the batch size of the first step."""
        return [KVCache(self.seq_len) for _ in self.blocks]

    def forward_step(self, tokens: Tensor | None, caches: list[KVCache], labels: Tensor | None = None) -> Tensor:
        """Logits [B, n, V] for the positions after the cached ones, appending their keys and values to `caches`.

        The first step (empty caches) takes the labels and optionally a prompt of tokens: [class, tokens] is
        prefilled and its last logits predict the next token. Later steps take the tokens just drawn [B, n]."""
        start = caches[0].length
        if (start == 0) != (labels is not None):
            raise ValueError("labels go with the first step (empty cache) and only with it")
        if tokens is None:
            tokens = torch.empty(labels.shape[0], 0, dtype=torch.long, device=labels.device)
        return self.logits_from_embeddings(self.embed(tokens, labels, start), caches)

    @torch.no_grad()
    def generate(
        self,
        labels: Tensor,
        generator: torch.Generator | None,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        cfg_scale: float = 1.0,
        use_cache: bool = True,
    ) -> Tensor:
        """Sample tokens [B, seq_len] for class labels [B].

        With cfg_scale != 1 the null class runs alongside (2B rows) and the logits are combined by `cfg_logits`;
        then divided by the temperature, filtered by top-k and top-p, and sampled with `generator`.
        use_cache=False recomputes the whole prefix each step (the reference the cache is tested against)."""
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        batch = labels.shape[0]
        guided = cfg_scale != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        tokens = torch.zeros(batch, self.seq_len, dtype=torch.long, device=labels.device)
        caches = self.new_cache() if use_cache else None
        for t in range(self.seq_len):
            if caches is None:
                prefix = tokens[:, :t].repeat(2, 1) if guided else tokens[:, :t]
                logits = self.logits_from_embeddings(self.embed(prefix, rows))[:, -1]
            elif t == 0:
                logits = self.forward_step(None, caches, labels=rows)[:, -1]
            else:
                last = tokens[:, t - 1 : t]
                logits = self.forward_step(last.repeat(2, 1) if guided else last, caches)[:, -1]
            logits = logits.float()
            if guided:
                logits = cfg_logits(logits[:batch], logits[batch:], cfg_scale)
            logits = top_p_filter(top_k_filter(logits / temperature, top_k), top_p)
            tokens[:, t] = sample_from_logits(logits, generator)
        return tokens
