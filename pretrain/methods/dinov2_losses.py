"""DINOv2's losses beside DINO's (kernels/dino_loss.py): Sinkhorn-Knopp teacher targets, the iBOT
cross-entropy on masked patch tokens, and the KoLeo spreading regularizer. Each follows the released code
(dinov2/loss/); where this one deviates for numerical safety the docstring says so, with the same result."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from pretrain.distributed import all_reduce_sum


@torch.no_grad()
def sinkhorn_knopp(
    logits: Tensor, temperature: float | Tensor, iterations: int = 3, count: int | None = None
) -> Tensor:
    """Teacher targets [B, K] from logits [B, K] (this rank's rows of the global batch) by Sinkhorn-Knopp
    (SwAV; DINOv2's replacement for centering): Q = exp(logits / temperature) is scaled alternately so every
    prototype gets an equal share of the global batch (column sums N / K) and every sample a distribution
    (row sums 1), `iterations` times. Column sums are reduced over ranks, so N ranks compute what one
    process computes on the concatenated batch. `count`: N, the global number of rows (default: the sum of
    every rank's B; iBOT passes its global count of masked patches).

    The released code exponentiates the raw scaled logits; this subtracts their global maximum first, which
    the first normalization cancels exactly and which keeps exp from overflowing at small temperatures, and
    guards its divisions against sums that underflowed to 0."""
    if logits.ndim != 2:
        raise ValueError(f"sinkhorn_knopp expects logits [B, K], got {tuple(logits.shape)}")
    if iterations < 1:
        raise ValueError(f"sinkhorn_knopp needs iterations >= 1, got {iterations}")
    scaled = logits.float() / temperature
    peak = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    q = torch.exp(scaled - peak).t()  # [K, B]
    prototypes = q.shape[0]
    rows = all_reduce_sum(torch.tensor(float(q.shape[1]), device=q.device)) if count is None else count
    tiny = torch.finfo(q.dtype).tiny  # a prototype or sample whose every entry underflowed stays 0, not NaN
    q /= all_reduce_sum(q.sum()).clamp_min(tiny)
    for _ in range(iterations):
        q /= all_reduce_sum(q.sum(dim=1, keepdim=True)).clamp_min(tiny)  # each prototype's share of the batch ...
        q /= prototypes  # ... made 1 / K
        q /= q.sum(dim=0, keepdim=True).clamp_min(tiny)  # each sample's column ...
        q /= rows  # ... made 1 / N
    return (q * rows).t()


def ibot_patch_loss(student_logits: Tensor, teacher_probs: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """iBOT's masked-image loss: student_logits and teacher_probs [M, K] for the M masked patch tokens of
    the batch, in the order of masks [B, L].nonzero(); -> the cross-entropy averaged over each image's
    masked tokens, then over all B images (an image without masked tokens adds 0), as the released code
    (dinov2/loss/ibot_patch_loss.py, forward_masked) weighs it."""
    if masks.ndim != 2 or student_logits.shape != teacher_probs.shape or student_logits.shape[0] != int(masks.sum()):
        raise ValueError(
            f"ibot_patch_loss expects student and teacher [M, K] for the M = {int(masks.sum())} masked tokens of "
            f"masks [B, L], got {tuple(student_logits.shape)} and {tuple(teacher_probs.shape)}"
        )
    per_token = -(teacher_probs.float() * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(-1)
    per_image = masks.sum(dim=-1, keepdim=True).clamp(min=1).expand_as(masks)[masks]
    return (per_token / per_image).sum() / masks.shape[0]


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """The Kozachenko-Leonenko differential-entropy estimator as a loss (Sablayrolles et al. 2019):
    -mean_i log(min_j!=i ||x_i - x_j||) over the L2-normalized rows of `features` [B, D] of this rank; it
    pushes each embedding away from its nearest neighbour. As the released code (koleo_loss.py): the
    nearest neighbour is the largest dot product, the distance is torch's pairwise_distance (which adds eps
    to the difference), in float32. Needs B >= 2."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(
            f"koleo_loss needs features [B, D] with B >= 2 (a nearest neighbour), got {tuple(features.shape)}"
        )
    x = F.normalize(features.float(), p=2, dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-1.0)  # never one's own neighbour (unit vectors: every dot >= -1)
        nearest = dots.argmax(dim=1)
    distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
    return -torch.log(distances + eps).mean()
