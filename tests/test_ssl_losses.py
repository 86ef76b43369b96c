"""MoCo v3 and DINO losses, schedules and EMA against direct implementations of the papers' formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.dino_loss import dino_loss, multicrop_pairs
from pretrain.methods.moco import moco_contrastive_loss
from pretrain.optim import cosine_ramp


def moco_ctr_from_paper(q: torch.Tensor, k: torch.Tensor, tau: float) -> torch.Tensor:
    """ctr(q, k) = -(1/N) sum_i log( exp(q_i.k_i / tau) / sum_j exp(q_i.k_j / tau) ) * 2 tau, row by row."""
    q, k = F.normalize(q.double(), dim=1), F.normalize(k.double(), dim=1)
    total = 0.0
    for i in range(q.shape[0]):
        logits = [math.exp(float(q[i] @ k[j]) / tau) for j in range(k.shape[0])]
        total += -math.log(logits[i] / sum(logits))
    return torch.tensor(total / q.shape[0] * 2 * tau, dtype=torch.float64)


def test_moco_loss_matches_the_paper_formula() -> None:
    torch.manual_seed(0)
    q, k = torch.randn(12, 16), torch.randn(12, 16)
    for tau in (0.2, 1.0):
        got = moco_contrastive_loss(q, k, tau, impl="reference")
        torch.testing.assert_close(got.double(), moco_ctr_from_paper(q, k, tau), rtol=1e-5, atol=1e-6)
        got_auto = moco_contrastive_loss(q, k, tau, impl="auto")
        torch.testing.assert_close(got_auto.double(), moco_ctr_from_paper(q, k, tau), rtol=1e-5, atol=1e-6)


def test_moco_loss_gradient_reaches_queries_only() -> None:
    q = torch.randn(6, 8, requires_grad=True)
    k = torch.randn(6, 8, requires_grad=True)
    moco_contrastive_loss(q, k, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert k.grad is None  # keys come from the momentum branch: no gradient


def dino_from_paper(student: list[torch.Tensor], teacher: list[torch.Tensor], center, tau_s, tau_t) -> torch.Tensor:
    """sum over global teacher views t and student views s != t of H(P_t, P_s), averaged over pairs."""
    total, pairs = 0.0, 0
    for ti, t in enumerate(teacher):
        p_t = F.softmax((t.double() - center.double()) / tau_t, dim=-1)
        for si, s in enumerate(student):
            if si == ti:
                continue
            log_p_s = F.log_softmax(s.double() / tau_s, dim=-1)
            total += float((-(p_t * log_p_s).sum(dim=-1)).mean())
            pairs += 1
    return torch.tensor(total / pairs, dtype=torch.float64)


@pytest.mark.parametrize("num_local", [0, 3])
def test_dino_loss_matches_the_paper_formula(num_local: int) -> None:
    torch.manual_seed(1)
    batch, dim = 5, 32
    student = [torch.randn(batch, dim) for _ in range(2 + num_local)]
    teacher = [torch.randn(batch, dim) for _ in range(2)]
    center = torch.randn(dim) * 0.1
    got = dino_loss(torch.stack(student), torch.stack(teacher), center, 0.1, 0.04)
    torch.testing.assert_close(got.double(), dino_from_paper(student, teacher, center, 0.1, 0.04), rtol=1e-5, atol=1e-6)


def test_multicrop_pairs_skip_identical_views_only() -> None:
    pairs = multicrop_pairs(2, 12)
    assert len(pairs) == 22
    assert (0, 0) not in pairs and (1, 1) not in pairs
    assert (0, 1) in pairs and (1, 0) in pairs and (1, 11) in pairs
    assert all(t < 2 for t, _ in pairs)
    assert multicrop_pairs(2, 2) == [(0, 1), (1, 0)]
    with pytest.raises(ValueError, match="num_global"):
        multicrop_pairs(3, 2)


def test_dino_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="student"):
        dino_loss(torch.randn(3, 4, 8), torch.randn(2, 4, 9), torch.zeros(9), 0.1, 0.04)


def test_cosine_momentum_schedule_runs_from_base_to_one() -> None:
    assert cosine_ramp(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert cosine_ramp(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert cosine_ramp(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert cosine_ramp(25, 100, 0.99, 1.0) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
