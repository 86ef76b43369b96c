"""Weighted kNN against a direct per-sample implementation of DINO's formula."""

import math

import torch

from pretrain.eval.knn import knn_top1, weighted_knn_predict


def direct_knn(train_x, train_y, test_x, num_classes, k, temperature):
    scores = []
    for x in test_x:
        sims = [float(torch.dot(x, t) / (x.norm() * t.norm())) for t in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        scores.append(votes)
    return torch.tensor(scores)


def test_matches_direct_formula():
    g = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(60, 8, generator=g), torch.randn(13, 8, generator=g)
    train_y = torch.randint(0, 4, (60,), generator=g)
    got = weighted_knn_predict(train_x, train_y, test_x, num_classes=4, k=7, temperature=0.5, chunk=5)
    want = direct_knn(train_x, train_y, test_x, 4, 7, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_separable_clusters_are_classified():
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(3) * 10
    train_y = torch.arange(3).repeat(20)
    test_y = torch.arange(3).repeat(5)
    train_x = centers[train_y] + torch.randn(60, 3, generator=g)
    test_x = centers[test_y] + torch.randn(15, 3, generator=g)
    assert knn_top1(train_x, train_y, test_x, test_y, num_classes=3, k=5) == 1.0


def test_k_larger_than_train_set():
    scores = weighted_knn_predict(torch.randn(3, 4), torch.tensor([0, 1, 1]), torch.randn(2, 4), 2, k=20)
    assert scores.shape == (2, 2)
