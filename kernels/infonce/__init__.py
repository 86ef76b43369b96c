"""InfoNCE / contrastive cross-entropy behind one function; callers never pick the implementation."""

from kernels.infonce.reference import default_positives, info_nce_reference


def info_nce(q, k, temperature: float, positives=None, normalize: bool = True, impl: str = "auto"):
    """Mean contrastive cross-entropy of queries q [N, D] against keys k [M, D] (see `info_nce_reference`).

    impl: "auto" picks the fastest correct path for the device; "reference" forces the formula.
    """
    if impl not in ("auto", "reference"):
        raise ValueError(f"unknown info_nce impl {impl!r}; available: auto, reference")
    return info_nce_reference(q, k, temperature, positives, normalize)


__all__ = ["default_positives", "info_nce", "info_nce_reference"]
