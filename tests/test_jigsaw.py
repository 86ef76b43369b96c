"""Jigsaw puzzles: the permutation set (size, greedy maximal minimum Hamming distance, determinism from the seed),
the tile geometry and extraction against direct indexing, the shuffle and its inverse, the loss against a
direct computation, the FLOP count, pictures, and config checks naming the key."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from pretrain.config import ConfigError
from pretrain.methods.jigsaw import all_permutations, maximal_hamming_permutations
from pretrain.methods.registry import build_method, flops_per_sample
from pretrain.methods.tiles import extract_tiles, normalize_each_tile, tile_origins
from pretrain.recipes import load_config

JIGSAW = [
    "method.name=jigsaw",
    "model.attn_backend=reference",
    "model.size=tiny",
    "model.patch_size=4",
    "data.image_size=16",
    "method.jigsaw.tile_size=4",
    "method.jigsaw.gap=1",
    "method.jigsaw.jitter=0",
    "method.jigsaw.permutations=10",
]


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a[:, None] != b[None]).sum(-1)


def test_permutation_set_is_the_greedy_maximal_minimum_hamming_selection():
    chosen = maximal_hamming_permutations(100, 9, seed=0)
    assert chosen.shape == (100, 9) and chosen.dtype == torch.long
    assert all(sorted(row) == list(range(9)) for row in chosen.tolist())
    assert len({tuple(row) for row in chosen.tolist()}) == 100
    distances = hamming(chosen, chosen) + 99 * torch.eye(100, dtype=torch.long)
    assert int(distances.min()) == 6  # at least 6 of the 9 tiles move between any two puzzles of the set
    # Greedy: each permutation is as far as any permutation could be from the ones chosen before it.
    candidates = all_permutations(9).long()
    for k in (1, 2, 10, 50, 99):
        best = hamming(candidates, chosen[:k]).min(dim=1).values.max()
        assert hamming(chosen[k : k + 1], chosen[:k]).min() == best
    # 2x2 grid: the first 3 of the 24 orders are pairwise 4 apart (every tile moves), the most possible.
    small = maximal_hamming_permutations(3, 4, seed=1)
    assert (hamming(small, small) + 4 * torch.eye(3, dtype=torch.long)).min() == 4


def test_permutation_set_is_reproducible_from_its_seed():
    assert torch.equal(maximal_hamming_permutations(20, 9, 3), maximal_hamming_permutations(20, 9, 3))
    assert not torch.equal(maximal_hamming_permutations(20, 9, 3), maximal_hamming_permutations(20, 9, 4))


def test_tile_origins_follow_gap_and_jitter():
    fixed = tile_origins(2, 32, 3, 8, 2, 0)
    # 3 x 8 + 2 x 2 = 28 px centered in 32: margin 2, stride 10.
    assert fixed[0, :, 0].tolist() == [2, 2, 2, 12, 12, 12, 22, 22, 22]
    assert fixed[0, :, 1].tolist() == [2, 12, 22] * 3
    torch.manual_seed(0)
    jittered = tile_origins(500, 32, 3, 8, 2, 1)
    offsets = jittered - fixed[:1]
    assert set(offsets.unique().tolist()) == {-1, 0, 1}
    assert jittered.min() >= 0 and (jittered + 8).max() <= 32
    # Each tile and axis draws its own offset.
    assert not torch.equal(offsets[:, 0], offsets[:, 1]) and not torch.equal(offsets[..., 0], offsets[..., 1])


def test_tile_extraction_matches_direct_indexing():
    images = torch.randn(3, 2, 20, 20, generator=torch.Generator().manual_seed(0))
    origins = torch.randint(0, 15, (3, 4, 2), generator=torch.Generator().manual_seed(1))
    tiles = extract_tiles(images, origins, 5)
    assert tiles.shape == (3, 4, 2, 5, 5)
    for b in range(3):
        for n in range(4):
            top, left = origins[b, n].tolist()
            assert torch.equal(tiles[b, n], images[b, :, top : top + 5, left : left + 5])


def test_each_tile_is_normalized_on_its_own():
    tiles = torch.randn(2, 9, 3, 6, 6) * torch.arange(1, 19.0).reshape(2, 9, 1, 1, 1) + 5
    normalized = normalize_each_tile(tiles)
    torch.testing.assert_close(normalized.mean(dim=(-2, -1)), torch.zeros(2, 9, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(normalized.std(dim=(-2, -1), unbiased=False), torch.ones(2, 9, 3), atol=1e-4, rtol=0)


def test_shuffle_puts_tile_perm_i_at_position_i_and_the_loss_is_its_cross_entropy():
    cfg = load_config(None, JIGSAW)
    method = build_method(cfg)
    assert torch.equal(method.permutations, maximal_hamming_permutations(10, 9, 0))
    assert "permutations" in method.state_dict()  # checkpointed with the run
    tiles = torch.arange(2 * 9, dtype=torch.float32).reshape(2, 9, 1, 1, 1).expand(2, 9, 3, 4, 4)
    labels = torch.tensor([3, 7])
    shuffled = method.shuffle(tiles, labels)
    for b in range(2):
        expected = [9 * b + t for t in method.permutations[labels[b]].tolist()]
        assert shuffled[b, :, 0, 0, 0].tolist() == expected

    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    out = method({"image": images})
    torch.manual_seed(5)
    labels = torch.randint(10, (3,))
    # No jitter here: tiles sit at 1 + 5 * (row, col).
    direct = torch.stack(
        [
            torch.stack(
                [images[b, :, 1 + 5 * r : 5 + 5 * r, 1 + 5 * c : 5 + 5 * c] for r in range(3) for c in range(3)]
            )
            for b in range(3)
        ]
    )
    puzzles = torch.stack([direct[b, method.permutations[labels[b]]] for b in range(3)])
    features = method.backbone.forward_features(normalize_each_tile(puzzles).flatten(0, 1), "mean")
    logits = method.head(features.reshape(3, -1))
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits, labels))
    picture = method.visuals({"image": images})["jigsaw"]
    assert picture.dtype == torch.uint8 and picture.shape[-1] == 3


def test_flop_count_matches_the_counter():
    """Forward exactly as FlopCounterMode counts it; training within 3% below 3 x forward."""
    cfg = load_config(None, [*JIGSAW, "method.jigsaw.head_hidden_dim=24"])
    method = build_method(cfg).train()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    analytic = flops_per_sample(cfg)
    with FlopCounterMode(display=False) as forward:
        method({"image": images})
    assert forward.get_total_flops() / 2 == pytest.approx(analytic["forward"], rel=1e-9)
    with FlopCounterMode(display=False) as train:
        method({"image": images})["loss"].backward()
    assert 0.97 * analytic["train"] <= train.get_total_flops() / 2 <= analytic["train"] * (1 + 1e-9)


def test_bad_settings_fail_naming_the_key_and_sizes():
    with pytest.raises(
        ConfigError,
        match=r"method.jigsaw.tile_size: a 3x3 grid of 4 px tiles with method.jigsaw.gap 2 and "
        r"method.jigsaw.jitter 1 spans 18 px, more than data.image_size 16",
    ):
        load_config(None, [*JIGSAW, "method.jigsaw.gap=2", "method.jigsaw.jitter=1"])
    with pytest.raises(ConfigError, match="method.jigsaw.tile_size: 6 px is not a multiple of model.patch_size 4"):
        load_config(None, [*JIGSAW, "method.jigsaw.tile_size=6"])
    with pytest.raises(ConfigError, match="method.jigsaw.permutations: 25 is more than the 24 orders of a 2x2"):
        load_config(None, [*JIGSAW, "method.jigsaw.grid=2", "method.jigsaw.permutations=25"])
    with pytest.raises(ConfigError, match="method.jigsaw.grid: .* at most 3, got 4"):
        load_config(None, [*JIGSAW, "method.jigsaw.grid=4"])
