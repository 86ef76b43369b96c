"""Weighted k-nearest-neighbour classification on frozen features, as DINO reports it.

Each of the k nearest training features (cosine similarity) votes for its class with weight
exp(similarity / T); T = 0.07 and k = 20 are the paper's defaults.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def weighted_knn_predict(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [num_test, num_classes]; test features are processed in chunks to bound memory."""
    if train_features.shape[0] != train_labels.shape[0]:
        raise ValueError(f"{train_features.shape[0]} training features but {train_labels.shape[0]} labels")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    scores = []
    for start in range(0, test_features.shape[0], chunk):
        test = F.normalize(test_features[start : start + chunk].float(), dim=1)
        similarity, index = (test @ train.T).topk(k, dim=1)
        weights = (similarity / temperature).exp()
        votes = torch.zeros(test.shape[0], num_classes, device=test.device)
        votes.scatter_add_(1, train_labels[index], weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_top1(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    scores = weighted_knn_predict(train_features, train_labels, test_features, num_classes, k, temperature)
    return (scores.argmax(dim=1) == test_labels).float().mean().item()
