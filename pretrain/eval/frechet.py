"""Frechet distance between two sets of features, each summarized by a Gaussian (the FID formula)."""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D, D] of features [N, D], in float64."""
    x = np.asarray(features.detach().cpu() if isinstance(features, torch.Tensor) else features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance_from_stats(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
    """|mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr((C1 C2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the symmetric
    C1^(1/2) C2 C1^(1/2), which has the same spectrum; unlike a general matrix square root this
    stays real and stable for the rank-deficient covariances of small sample sets.
    """
    eigval, eigvec = np.linalg.eigh(cov1)
    sqrt1 = (eigvec * np.sqrt(np.clip(eigval, 0, None))) @ eigvec.T
    middle = np.linalg.eigvalsh(sqrt1 @ cov2 @ sqrt1)
    trace_sqrt = np.sqrt(np.clip(middle, 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt)


def frechet_distance(features_a: torch.Tensor | np.ndarray, features_b: torch.Tensor | np.ndarray) -> float:
    return frechet_distance_from_stats(*feature_statistics(features_a), *feature_statistics(features_b))
