"""DINOv2's losses and iBOT's masks against direct computations: Sinkhorn-Knopp as the released loop
writes it (1 and 2 processes), KoLeo by brute-force nearest neighbours, the iBOT loss by a loop over masked
tokens, and the block masks' counts, strata and shapes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.dino_loss import dino_cross_entropy, dino_loss, teacher_probabilities
from pretrain.methods.block_masking import BlockMasking, ibot_masks
from pretrain.methods.dinov2_losses import ibot_patch_loss, koleo_loss, sinkhorn_knopp


def released_sinkhorn(logits: torch.Tensor, temperature: float, iterations: int = 3) -> torch.Tensor:
    """dinov2/loss/dino_clstoken_loss.py's sinkhorn_knopp_teacher, one process, in float64."""
    q = torch.exp(logits.double() / temperature).t()
    rows, prototypes = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= rows
    q *= rows
    return q.t()


def test_sinkhorn_knopp_is_the_released_loop_and_balances_the_prototypes():
    logits = torch.randn(12, 5, generator=torch.Generator().manual_seed(0)) * 2
    targets = sinkhorn_knopp(logits, 0.5)
    torch.testing.assert_close(targets.double(), released_sinkhorn(logits, 0.5), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(12))  # each sample a distribution
    softmax = (logits / 0.5).softmax(dim=-1)
    spread = lambda t: (t.sum(dim=0) - 12 / 5).abs().max()  # noqa: E731 - distance from equal shares N / K
    assert spread(targets) < spread(softmax) / 3
    converged = sinkhorn_knopp(logits, 0.5, iterations=200)
    torch.testing.assert_close(converged.sum(dim=0), torch.full((5,), 12 / 5), rtol=1e-4, atol=1e-4)
    # Small temperatures: the released exp overflows to inf (NaN targets); subtracting the maximum does not.
    sharp = sinkhorn_knopp(logits * 50, 0.04)
    assert torch.isfinite(sharp).all() and torch.isnan(released_sinkhorn(logits.float() * 50, 0.04).float()).any()
    with pytest.raises(ValueError, match="logits"):
        sinkhorn_knopp(logits[0], 0.5)


def test_sinkhorn_knopp_on_two_ranks_is_one_process(tmp_path):
    from dist_sinkhorn import SPLIT, fixed_logits

    from test_engines import REPO, torchrun

    out = tmp_path / "sk.pt"
    torchrun(2, [str(REPO / "tests/dist_sinkhorn.py"), str(out)])
    first, second = torch.load(out)
    assert first.shape[0] == SPLIT
    torch.testing.assert_close(torch.cat([first, second]), sinkhorn_knopp(fixed_logits(), 0.1))


def test_koleo_is_minus_the_mean_log_nearest_neighbour_distance():
    features = torch.randn(9, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x = F.normalize(features.detach(), dim=-1)
    nearest = [min((x[i] - x[j]).norm() for j in range(9) if j != i) for i in range(9)]
    expected = -sum(math.log(float(d)) for d in nearest) / 9
    loss = koleo_loss(features)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.isfinite(features.grad).all() and features.grad.abs().sum() > 0
    # Spreading the points out lowers it.
    assert koleo_loss(torch.eye(6)) < koleo_loss(torch.eye(6) + 0.9)
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(features[:1])


def test_ibot_loss_is_the_per_image_mean_over_masked_tokens():
    generator = torch.Generator().manual_seed(2)
    masks = torch.zeros(4, 6, dtype=torch.bool)
    masks[0, [0, 3, 4]] = True
    masks[2, [5]] = True  # images 1 and 3 have no masked token: they add 0 but count in the batch
    student = torch.randn(4, 6, 10, generator=generator)
    teacher = torch.randn(4, 6, 10, generator=generator).softmax(-1)
    total = 0.0
    for b in range(4):
        tokens = masks[b].nonzero().flatten().tolist()
        per_token = [-(teacher[b, t] * (student[b, t] / 0.1).log_softmax(-1)).sum() for t in tokens]
        total += sum(per_token) / len(tokens) if tokens else 0.0
    loss = ibot_patch_loss(student[masks], teacher[masks], masks, 0.1)
    assert loss.item() == pytest.approx(float(total) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="masked tokens"):
        ibot_patch_loss(student[masks][:2], teacher[masks][:2], masks, 0.1)


def test_dino_cross_entropy_from_targets_is_dino_loss():
    generator = torch.Generator().manual_seed(3)
    student, teacher, center = torch.randn(4, 3, 8, generator=generator), torch.randn(2, 3, 8), torch.randn(8)
    probs = teacher_probabilities(teacher, center, 0.04)
    torch.testing.assert_close(dino_cross_entropy(student, probs, 0.1), dino_loss(student, teacher, center, 0.1, 0.04))


def test_block_masks_hit_their_targets_strata_and_shapes():
    masking = BlockMasking(14)  # max 98 patches per rectangle
    generator = torch.Generator().manual_seed(4)
    # One rectangle on an empty grid: a filled box of at most the allowed area.
    for _ in range(50):
        mask = torch.zeros(14, 14, dtype=torch.bool)
        added = masking.add_block(mask, 30, generator)
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        box = mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        assert box.all() and 1 <= added == int(mask.sum()) <= 30
        height, width = box.shape
        assert 0.3 / 1.6 <= height / width <= 1.6 / 0.3  # aspect in [0.3, 1 / 0.3], up to the rounding of sides
    # Whole masks never exceed their target and come close to it.
    counts = [int(masking(60, generator).sum()) for _ in range(40)]
    assert max(counts) <= 60 and sum(counts) / 40 > 50
    # A batch: int(B x p) masked images, one per stratum of [0.1, 0.5] (sorted, each at most its upper bound).
    masks = ibot_masks(range(16), 16, masking, 0.5, (0.1, 0.5), seed=4)
    assert masks.shape == (16, 196) and int((masks.sum(1) > 0).sum()) == 8
    bounds = torch.linspace(0.1, 0.5, 9)
    for count, high in zip(sorted(masks.sum(1).tolist())[8:], bounds[1:].tolist()):
        assert 0 < count <= int(196 * high)
    # Seeded: the same seed draws the same masks, another seed others.
    again = [ibot_masks(range(8), 8, masking, 0.5, seed=9) for _ in range(2)]
    assert torch.equal(*again) and not torch.equal(again[0], ibot_masks(range(8), 8, masking, 0.5, seed=10))
    with pytest.raises(ValueError, match="iBOT masking"):
        ibot_masks(range(4), 4, masking, 1.5)
    with pytest.raises(ValueError, match="outside"):
        ibot_masks(range(2, 6), 4, masking)
