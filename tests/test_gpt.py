"""TokenGPT (pretrain/models/gpt.py): causal through gradients on every CPU attention backend, the KV cache
reproduces full recomputation (logits and sampled tokens), the logit filters and guidance match direct
implementations, label dropout and the loss do what they say.

The triton backend runs through the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1 before
triton is imported), so its cases stay tiny.
"""

import time

import pytest
import torch
import torch.nn.functional as F

from kernels.attention import available_backends
from pretrain.models.gpt import (
    TokenGPT,
    cfg_logits,
    sample_from_logits,
    top_k_filter,
    top_p_filter,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


VOCAB, SEQ, CLASSES, DIM, DEPTH, HEADS = 32, 16, 10, 32, 2, 2
BACKENDS = [name for name in ("sdpa", "reference", "triton") if name in available_backends()]


def _model(seed: int = 0, **kwargs) -> TokenGPT:
    torch.manual_seed(seed)
    options = dict(vocab_size=VOCAB, seq_len=SEQ, num_classes=CLASSES, dim=DIM, depth=DEPTH, heads=HEADS)
    return TokenGPT(**(options | kwargs)).eval()


def _data(batch: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (batch, SEQ), generator=generator)
    labels = torch.randint(0, CLASSES, (batch,), generator=generator)
    return tokens, labels


# ------------------------------------------------------------------------------------- causality


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_at_t_depend_only_on_inputs_up_to_t(backend: str) -> None:
    """Row b of a batch of identical sequences backpropagates logits[b, b] into the blocks' input vectors (the
    class prefix at 0, tok_j at j + 1): the gradient is exactly zero after position b and nonzero up to it."""
    model = _model(attn_backend=backend)
    tokens, labels = _data(1)
    tokens, labels = tokens.expand(SEQ, SEQ), labels.expand(SEQ)
    x = model.embed(tokens[:, :-1], labels).detach().requires_grad_()
    logits = model.logits_from_embeddings(x)
    assert logits.shape == (SEQ, SEQ, VOCAB)
    rows = torch.arange(SEQ)
    upstream = torch.randn(SEQ, VOCAB, generator=torch.Generator().manual_seed(2))
    (logits[rows, rows] * upstream).sum().backward()
    per_position = x.grad.abs().sum(dim=-1)  # [row t, input position]
    after = rows[None, :] > rows[:, None]
    assert torch.all(per_position[after] == 0), f"{backend}: logits at t see inputs after t"
    assert torch.all(per_position[~after] > 0), f"{backend}: logits at t ignore some input at or before t"


def test_forward_reads_the_sequence_shifted_by_the_class_prefix() -> None:
    """forward reads [class, tok_0 .. tok_{T-2}]: changing the last token leaves every logit unchanged, changing
    tok_3 leaves logits[:, :4] unchanged and changes logits[:, 4]."""
    model = _model()
    tokens, labels = _data(2)
    base = model(tokens, labels)
    last = tokens.clone()
    last[:, -1] = (last[:, -1] + 1) % VOCAB
    torch.testing.assert_close(model(last, labels), base, rtol=0, atol=0)
    mid = tokens.clone()
    mid[:, 3] = (mid[:, 3] + 1) % VOCAB
    changed = model(mid, labels)
    torch.testing.assert_close(changed[:, :4], base[:, :4], rtol=0, atol=0)
    assert not torch.allclose(changed[:, 4], base[:, 4])


# ------------------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize("backend", BACKENDS)
def test_cached_step_logits_equal_full_forward(backend: str) -> None:
    """A prefill of [class, 4 tokens] (5 queries over 5 keys), then one token per step (1 query over the cache):
    every position's logits equal the full teacher-forced forward's."""
    model = _model(attn_backend=backend)
    tokens, labels = _data(3)
    full = model(tokens, labels)
    with torch.no_grad():
        caches = model.new_cache()
        steps = [model.forward_step(tokens[:, :4], caches, labels=labels)]
        for t in range(4, SEQ - 1):
            steps.append(model.forward_step(tokens[:, t : t + 1], caches))
    assert caches[0].length == SEQ
    torch.testing.assert_close(torch.cat(steps, dim=1), full.detach(), rtol=0, atol=1e-5)


def test_cache_misuse_fails_clearly() -> None:
    model = _model()
    tokens, labels = _data(2)
    caches = model.new_cache()
    with pytest.raises(ValueError, match="labels go with the first step"):
        model.forward_step(tokens[:, :1], caches)
    model.forward_step(tokens[:, : SEQ - 1], caches, labels=labels)
    with pytest.raises(ValueError, match="exceed seq_len"):
        model.forward_step(tokens[:, :1], caches)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(top_k=8, top_p=0.8, temperature=0.7),
        dict(cfg_scale=3.0),
        dict(cfg_scale=2.0, top_k=8, top_p=0.8, temperature=0.7),
    ],
    ids=["plain", "top_k_top_p", "cfg", "cfg_top_k_top_p"],
)
def test_cached_generation_equals_recomputation(options: dict) -> None:
    model = _model()
    labels = torch.tensor([0, 3, 7])
    cached = model.generate(labels, torch.Generator().manual_seed(5), use_cache=True, **options)
    recomputed = model.generate(labels, torch.Generator().manual_seed(5), use_cache=False, **options)
    assert cached.shape == (3, SEQ) and cached.dtype == torch.long
    assert torch.equal(cached, recomputed)
    other_seed = model.generate(labels, torch.Generator().manual_seed(6), use_cache=True, **options)
    assert not torch.equal(cached, other_seed)


def test_top_k_one_is_greedy_decoding_of_the_full_forward() -> None:
    """With k = 1 the sample is the argmax whatever the noise: each generated token is the argmax of the full
    forward's logits at its position, with and without guidance."""
    model = _model()
    labels = torch.tensor([1, 2])
    tokens = model.generate(labels, torch.Generator().manual_seed(0), top_k=1)
    with torch.no_grad():
        assert torch.equal(model(tokens, labels).argmax(-1), tokens)
        guided = model.generate(labels, torch.Generator().manual_seed(0), top_k=1, cfg_scale=4.0)
        null = torch.full_like(labels, model.null_class)
        expected = cfg_logits(model(guided, labels), model(guided, null), 4.0).argmax(-1)
    assert torch.equal(expected, guided)


@pytest.mark.parametrize("use_cache", [True, False])
def test_scale_one_runs_only_the_conditional_rows(use_cache: bool) -> None:
    """cfg_scale = 1 puts B rows through the network (no null half); any other scale 2B, half of them null."""
    model = _model()
    seen_rows: list[int] = []
    seen_classes: list[torch.Tensor] = []
    model.blocks[0].register_forward_hook(lambda module, args, out: seen_rows.append(args[0].shape[0]))
    model.class_embed.register_forward_hook(lambda module, args, out: seen_classes.append(args[0].clone()))
    labels = torch.tensor([0, 4, 9])
    model.generate(labels, torch.Generator().manual_seed(0), use_cache=use_cache, cfg_scale=1.0)
    assert set(seen_rows) == {3} and len(seen_rows) == SEQ
    assert all(torch.equal(c, labels) for c in seen_classes)
    seen_rows.clear()
    seen_classes.clear()
    model.generate(labels, torch.Generator().manual_seed(0), use_cache=use_cache, cfg_scale=1.5)
    assert set(seen_rows) == {6}
    null = torch.full_like(labels, model.null_class)
    assert all(torch.equal(c, torch.cat([labels, null])) for c in seen_classes)


@pytest.mark.parametrize("cfg_scale", [1.0, 2.5])
def test_generation_equals_sampling_by_hand(cfg_scale: float) -> None:
    """Generation equals a loop by hand over the full forward: guidance (none at s = 1), then temperature, then
    top-k, then top-p (which, unlike top-k, depends on the temperature), then one Gumbel-max draw."""
    model = _model()
    labels = torch.tensor([2, 5, 6])
    null = torch.full_like(labels, model.null_class)
    options = dict(temperature=0.2, top_k=20, top_p=0.6)
    tokens = model.generate(labels, torch.Generator().manual_seed(3), cfg_scale=cfg_scale, **options)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        by_hand = torch.zeros_like(tokens)
        for t in range(SEQ):
            padded = torch.cat([by_hand[:, :t], by_hand[:, :1]], dim=1)  # forward drops the last token
            logits = model(padded, labels)[:, t]
            if cfg_scale != 1.0:
                logits = model(padded, null)[:, t] + cfg_scale * (logits - model(padded, null)[:, t])
            logits = top_p_filter(top_k_filter(logits / 0.2, 20), 0.6)
            by_hand[:, t] = sample_from_logits(logits, generator)
    assert torch.equal(tokens, by_hand)


def test_cached_generation_equals_recomputation_reference_backend() -> None:
    """(triton's cache path is covered by the per-step logits test; a whole generation is too slow interpreted.)"""
    model = _model(attn_backend="reference")
    labels = torch.tensor([1, 8])
    options = dict(cfg_scale=2.0, top_k=8, top_p=0.9)
    cached = model.generate(labels, torch.Generator().manual_seed(4), use_cache=True, **options)
    recomputed = model.generate(labels, torch.Generator().manual_seed(4), use_cache=False, **options)
    assert torch.equal(cached, recomputed)


# ------------------------------------------------------------------------------------- filters, guidance, sampling


def _top_k_by_hand(row: list[float], k: int) -> list[float]:
    kth = sorted(row, reverse=True)[k - 1] if 0 < k < len(row) else min(row)
    return [x if x >= kth else float("-inf") for x in row]


def _top_p_by_hand(row: list[float], p: float) -> list[float]:
    """Walk the tokens from most to least probable until the mass reaches p; keep those and their ties."""
    if p >= 1:
        return list(row)
    total = sum(torch.tensor(row).exp().tolist())
    mass, threshold = 0.0, None
    for x in sorted(row, reverse=True):
        threshold = x
        mass += torch.tensor(x).exp().item() / total
        if mass >= p:
            break
    return [x if x >= threshold else float("-inf") for x in row]


def _rows(seed: int, n: int = 6, vocab: int = 12) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("k", [1, 3, 11, 12, 50, 0])
def test_top_k_filter_matches_by_hand(k: int) -> None:
    logits = _rows(0)
    expected = torch.tensor([_top_k_by_hand(row, k) for row in logits.tolist()])
    torch.testing.assert_close(top_k_filter(logits, k), expected, rtol=0, atol=0)
    kept = torch.isfinite(top_k_filter(logits, k)).sum(-1)
    assert torch.all(kept == (k if 0 < k < 12 else 12))


def test_top_k_filter_keeps_ties_and_batches() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 2.0, 0.0], [5.0, 5.0, 5.0, 5.0, 5.0]])
    out = top_k_filter(logits, 2)
    assert torch.isfinite(out).tolist() == [[False, True, True, True, False], [True] * 5]
    torch.testing.assert_close(top_k_filter(logits[:, None].expand(2, 3, 5), 2), out[:, None].expand(2, 3, 5))


@pytest.mark.parametrize("p", [1e-6, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_filter_matches_sort_by_hand(p: float) -> None:
    logits = _rows(1)
    expected = torch.tensor([_top_p_by_hand(row, p) for row in logits.tolist()])
    out = top_p_filter(logits, p)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    kept_mass = torch.where(torch.isfinite(out), logits.softmax(-1), 0).sum(-1)
    assert torch.all(kept_mass >= p - 1e-6)
    if p == 1.0:
        assert out is logits


def test_top_p_filter_edge_cases() -> None:
    logits = _rows(2)
    # a tiny p keeps only the argmax, and so does p = 0 (never an empty set)
    for p in (1e-9, 0.0):
        tiny = top_p_filter(logits, p)
        assert torch.equal(torch.isfinite(tiny).sum(-1), torch.ones(6, dtype=torch.long))
        assert torch.equal(tiny.argmax(-1), logits.argmax(-1))
    # probabilities 0.5, 0.25, 0.25: p = 0.5 stops at the first; p = 0.6 needs a 0.25, and both tie
    halves = torch.tensor([[0.5, 0.25, 0.25, 0.0]]).clamp_min(1e-30).log()
    assert torch.isfinite(top_p_filter(halves, 0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(top_p_filter(halves, 0.6)).tolist() == [[True, True, True, False]]
    # already -inf entries (after top-k) stay out, and the kept ones keep their values
    masked = top_p_filter(top_k_filter(logits, 4), 0.95)
    assert torch.all(torch.isfinite(masked).sum(-1) <= 4)
    finite = torch.isfinite(masked)
    torch.testing.assert_close(masked[finite], logits[finite])


def test_cfg_logits_formula_and_scale_one() -> None:
    cond, uncond = _rows(3), _rows(4)
    for scale in (0.0, 1.5, 4.0):
        torch.testing.assert_close(cfg_logits(cond, uncond, scale), uncond + scale * (cond - uncond))
    assert cfg_logits(cond, uncond, 1.0) is cond
    torch.testing.assert_close(cfg_logits(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(cfg_logits(cond, uncond, 2.0), 2 * cond - uncond)


def test_sampling_follows_softmax_and_the_generator() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, float("-inf")]]).expand(20000, 4)
    draws = sample_from_logits(logits, torch.Generator().manual_seed(0))
    frequencies = torch.bincount(draws, minlength=4).float() / draws.numel()
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.012, rtol=0)
    again = sample_from_logits(logits, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


# ------------------------------------------------------------------------------------- training pieces


def test_drop_labels_rates_and_generator() -> None:
    labels = torch.arange(CLASSES).repeat(50)
    kept = _model(class_dropout=0.0).drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.equal(kept, labels)
    dropped = _model(class_dropout=1.0).drop_labels(labels, torch.Generator().manual_seed(0))
    assert torch.all(dropped == CLASSES)
    model = _model(class_dropout=0.3)
    first = model.drop_labels(labels, torch.Generator().manual_seed(7))
    assert torch.equal(first, model.drop_labels(labels, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, model.drop_labels(labels, torch.Generator().manual_seed(8)))
    is_null = first == model.null_class
    assert torch.equal(first[~is_null], labels[~is_null])
    assert 0.2 < is_null.float().mean().item() < 0.4
    expected = torch.rand(labels.shape, generator=torch.Generator().manual_seed(7)) < 0.3
    assert torch.equal(is_null, expected)


def test_loss_is_cross_entropy_of_the_shifted_targets() -> None:
    model = _model()
    tokens, labels = _data(4)
    logits = model(tokens, labels)
    log_probs = logits.log_softmax(-1)
    by_hand = -log_probs.gather(-1, tokens[..., None]).mean()
    torch.testing.assert_close(model.loss(tokens, labels), by_hand)
    torch.testing.assert_close(model.loss(tokens, labels), F.cross_entropy(logits.transpose(1, 2), tokens))
    # at init the prediction is near uniform
    assert abs(model.loss(tokens, labels).item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.1


def test_gpt2_init() -> None:
    torch.manual_seed(0)
    model = TokenGPT(vocab_size=512, seq_len=64, num_classes=10, dim=256, depth=8, heads=4)
    std = lambda t: t.detach().std().item()  # noqa: E731
    assert abs(std(model.tok_embed.weight) - 0.02) < 0.002
    assert abs(std(model.blocks[0].attn.qkv.weight) - 0.02) < 0.002
    assert abs(std(model.head.weight) - 0.02) < 0.002
    residual = 0.02 / 4.0
    for block in model.blocks:
        assert abs(std(block.attn.proj.weight) - residual) < 0.1 * residual
        assert abs(std(block.mlp.fc2.weight) - residual) < 0.1 * residual
        assert torch.all(block.attn.qkv.bias == 0) and torch.all(block.norm1.weight == 1)
    assert model.head.bias is None and model.head.weight is not model.tok_embed.weight
    assert model.class_embed.weight.shape == (11, 256)


def test_one_training_step_reduces_the_loss() -> None:
    model = _model(class_dropout=0.1).train()
    tokens, labels = _data(8)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    first = None
    for _ in range(10):
        loss = model.loss(tokens, model.drop_labels(labels, generator))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < first - 0.3


def test_generation_time_with_and_without_cache() -> None:
    """Prints the wall time of generating at seq_len 64 both ways (no assertion on speed: it is a measurement)."""
    model = _model(seq_len=64)
    labels = torch.tensor([0, 1, 2, 3])
    times = {}
    for use_cache in (True, False):
        start = time.perf_counter()
        tokens = model.generate(labels, torch.Generator().manual_seed(0), cfg_scale=2.0, use_cache=use_cache)
        times[use_cache] = time.perf_counter() - start
        times[f"tokens_{use_cache}"] = tokens
    assert torch.equal(times["tokens_True"], times["tokens_False"])
    print(f"\ngenerate 4 x 64 tokens, cfg: cached {times[True]:.3f}s, recomputed {times[False]:.3f}s")
