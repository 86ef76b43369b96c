"""Vector quantizer: the bottleneck of VQ-VAE (van den Oord et al. 2017) and VQGAN (Esser et al. 2021).

Each D-vector of the input is replaced by its nearest code (squared L2, ties to the lowest index), with
the straight-through estimator passing the decoder's gradient to the encoder unchanged. The codebook
learns one of two ways:

- "straight_through": the codes are a parameter trained by the codebook loss
  ||sg[z] - e||^2 + beta ||z - sg[e]||^2 (VQ-VAE eq. 3, means over elements);
- "ema": the codes are buffers, each the exponential moving average of the vectors assigned to it
  (VQ-VAE appendix A.1; Razavi et al. 2019, VQ-VAE-2): N_i <- d N_i + (1 - d) n_i,
  m_i <- d m_i + (1 - d) sum_{z -> i} z, e_i = m_i / N~_i with the Laplace-smoothed count
  N~_i = (N_i + eps) / (sum N + K eps) * sum N (Sonnet's VectorQuantizerEMA; N itself is stored
  unsmoothed). Only beta * commitment is a loss.

Data parallelism: the per-code counts n_i and sums of z are all-reduced (SUM) before they touch the EMA, so
R ranks holding slices of a batch update exactly as one process on the whole batch, and every rank keeps
the same codebook. The usage and perplexity metrics come from the same reduced histogram. Every rank must
therefore call `forward` the same number of times (eval included). Without a process group the
collectives are no-ops.

Dead codes (Jukebox, Dhariwal et al. 2020): in training, before the lookup, every code whose usage EMA
(N_i for "ema", a separate `usage` buffer with the same decay for "straight_through") is below
`dead_code_threshold` (expected assignments per global batch; 0 disables) is moved onto a random input
vector of the current batch, and its statistics restart as if it had been assigned that vector
`dead_code_threshold` times (N_i = T, m_i = T z; usage_i = T). Doing it before the lookup lets the
restarted code take part in this batch's assignment and update, and keeps the in-place write out of any
autograd graph. How every rank picks the same vectors without gathering the batch: the ranks all-gather
their vector counts, so each knows the global batch as the concatenation of the ranks' slices in rank
order; every rank draws the same global row numbers from the caller's generator (which must be seeded the
same on every rank, e.g. from the run seed and the step), and rank 0's draw is broadcast anyway so a
per-rank seeded global RNG (`generator=None`) cannot diverge; each rank fills in the rows it holds and a
SUM all-reduce of the [dead, D] picks (one nonzero term per row, so exact) gives every rank the same
vectors, those one process would pick from the concatenated batch. In "straight_through" mode the
restart writes the parameter in place: keep the quantizer out of FSDP sharding (it is small).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import all_gather_cat, all_reduce_sum

Update = Literal["ema", "straight_through"]


@dataclass
class Quantized:
    """What one call returns. `quantized` has the input's shape and value e[indices] exactly."""

    quantized: Tensor
    indices: Tensor  # [B, H, W] for [B, D, H, W] inputs, [N] for [N, D]
    loss: Tensor
    usage: Tensor  # fraction of codes used by the global batch
    perplexity: Tensor  # exp(entropy) of the global batch's code histogram
    restarted: int  # dead codes moved onto batch vectors in this call


def nearest_codes(flat: Tensor, codebook: Tensor, max_elements: int = 1 << 24) -> Tensor:
    """Index of the nearest code per row by ||z||^2 - 2 z.e + ||e||^2 (argmin keeps the lowest index on
    ties), in float32 and in row chunks so the [N, K] distances never exceed `max_elements`."""
    with torch.no_grad(), torch.autocast(flat.device.type, enabled=False):
        flat, codebook = flat.float(), codebook.float()
        code_sq = codebook.square().sum(1)
        rows = max(1, max_elements // codebook.shape[0])
        parts = []
        for part in flat.split(rows):
            distances = part.square().sum(1, keepdim=True) - 2.0 * part @ codebook.T + code_sq
            parts.append(distances.argmin(1))
        return torch.cat(parts) if parts else flat.new_zeros(0, dtype=torch.long)


def histogram_metrics(counts: Tensor) -> tuple[Tensor, Tensor]:
    """(fraction of codes with a nonzero count, exp(-sum p log p)) of a code histogram; 0 log 0 = 0."""
    probs = counts.float() / counts.sum().clamp_min(1)
    return (counts > 0).float().mean(), torch.exp(-torch.special.xlogy(probs, probs).sum())


def laplace_smoothed(counts: Tensor, eps: float) -> Tensor:
    """(N_i + eps) / (sum N + K eps) * sum N: the same total, but no code divides by zero."""
    total = counts.sum()
    return (counts + eps) / (total + counts.numel() * eps) * total


def broadcast_from_first_rank(tensor: Tensor) -> Tensor:
    """Rank 0's `tensor` on every rank, in place (a no-op without a process group)."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def pick_global_rows(local: Tensor, count: int, generator: torch.Generator | None) -> Tensor | None:
    """`count` rows drawn uniformly (with replacement) from the concatenation over ranks of every rank's
    `local` [n_r, D], the same on every rank, without gathering the rows themselves (module docstring);
    None when the global batch is empty."""
    sizes = all_gather_cat(torch.tensor([local.shape[0]], device=local.device))
    if int(sizes.sum()) == 0:
        return None
    starts = torch.cumsum(sizes, 0) - sizes
    device = generator.device if generator is not None else torch.device("cpu")
    rows = torch.randint(int(sizes.sum()), (count,), generator=generator, device=device)
    rows = broadcast_from_first_rank(rows.to(local.device))
    start = int(starts[dist.get_rank()]) if dist.is_initialized() else 0
    mine = (rows >= start) & (rows < start + local.shape[0])
    picked = local.new_zeros(count, local.shape[1])
    picked[mine] = local[rows[mine] - start]
    return all_reduce_sum(picked)


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of [B, D, H, W] or [N, D] inputs; see the module docstring."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        beta: float = 0.25,
        update: Update = "ema",
        ema_decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 1.0,
        l2_normalize: bool = False,
    ) -> None:
        super().__init__()
        if update not in ("ema", "straight_through"):
            raise ValueError(f"VectorQuantizer update must be 'ema' or 'straight_through', got {update!r}")
        if num_codes < 1 or dim < 1:
            raise ValueError(f"VectorQuantizer needs num_codes >= 1 and dim >= 1, got {num_codes}, {dim}")
        if not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"VectorQuantizer ema_decay must be in [0, 1), got {ema_decay}")
        if dead_code_threshold < 0:
            raise ValueError(f"VectorQuantizer dead_code_threshold must be >= 0, got {dead_code_threshold}")
        self.num_codes, self.dim, self.beta, self.update = num_codes, dim, beta, update
        self.ema_decay, self.eps = ema_decay, eps
        self.dead_code_threshold, self.l2_normalize = dead_code_threshold, l2_normalize
        if update == "ema":
            # The codebook moves by EMA, never by gradient: buffers, so no optimizer or weight decay sees it.
            self.register_buffer("embedding", torch.empty(num_codes, dim))
            self.register_buffer("ema_count", torch.empty(num_codes))  # N_i
            self.register_buffer("ema_sum", torch.empty(num_codes, dim))  # m_i
        else:
            self.embedding = nn.Parameter(torch.empty(num_codes, dim))
            self.register_buffer("usage", torch.empty(num_codes))  # only for dead-code restarts
        self.init_weights()

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, dim={self.dim}, update={self.update}, beta={self.beta}, "
            f"ema_decay={self.ema_decay}, dead_code_threshold={self.dead_code_threshold}, "
            f"l2_normalize={self.l2_normalize}"
        )

    @torch.no_grad()
    def init_weights(self) -> None:
        """Codes ~ U(+-sqrt(3 / D)), unit expected norm (Sonnet's variance scaling); every code starts as if
        used once (N = usage = 1, m = e), so an unused code keeps its place instead of collapsing to 0."""
        bound = math.sqrt(3.0 / self.dim)
        nn.init.uniform_(self.embedding, -bound, bound)
        if self.update == "ema":
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(self.embedding)
        else:
            self.usage.fill_(1.0)

    reset_parameters = init_weights  # so a generic "reset every module" pass (meta-device init) reaches it

    def codebook(self) -> Tensor:
        """The codes the lookup uses: unit vectors when `l2_normalize` (ViT-VQGAN, Yu et al. 2021)."""
        return F.normalize(self.embedding, dim=1) if self.l2_normalize else self.embedding

    def lookup(self, indices: Tensor) -> Tensor:
        """Codes of an index map [B, H, W] as [B, D, H, W] (or of [N] as [N, D]): decoding tokens."""
        codes = self.codebook()[indices]
        return codes.movedim(-1, 1) if indices.dim() == 3 else codes

    def forward(self, z: Tensor, generator: torch.Generator | None = None) -> Quantized:
        """`generator` draws dead-code replacements; seed it identically on every rank (module docstring)."""
        if z.dim() not in (2, 4) or z.shape[1] != self.dim:
            raise ValueError(f"VectorQuantizer expects [B, {self.dim}, H, W] or [N, {self.dim}], got {list(z.shape)}")
        flat = z.movedim(1, -1).reshape(-1, self.dim) if z.dim() == 4 else z
        if self.l2_normalize:
            flat = F.normalize(flat, dim=1)
        vectors = flat.detach().to(torch.promote_types(self.embedding.dtype, torch.float32))  # >= float32
        restarted = self.restart_dead_codes(vectors, generator) if self.training else 0

        codebook = self.codebook()
        indices = nearest_codes(vectors, codebook)
        codes = codebook[indices]
        counts = self.record_assignments(vectors, indices)

        commitment = F.mse_loss(flat.float(), codes.detach().float())
        loss = self.beta * commitment
        if self.update == "straight_through":
            loss = loss + F.mse_loss(codes.float(), vectors)
        # Straight-through: the value is e[indices] bit for bit (so decoding the indices reproduces it), the
        # gradient with respect to z the identity, as z + sg[e - z] but exact.
        quantized = (flat - flat.detach()) + codes.detach().to(flat.dtype)
        if z.dim() == 4:
            batch, _, height, width = z.shape
            quantized = quantized.reshape(batch, height, width, self.dim).movedim(-1, 1)
            indices = indices.reshape(batch, height, width)
        usage, perplexity = histogram_metrics(counts)
        return Quantized(quantized, indices, loss, usage, perplexity, restarted)

    @torch.no_grad()
    def record_assignments(self, vectors: Tensor, indices: Tensor) -> Tensor:
        """The global code histogram; in training also the EMA update ("ema") or the usage EMA."""
        counts = torch.bincount(indices, minlength=self.num_codes).to(vectors.dtype)
        decay = self.ema_decay
        if self.training and self.update == "ema":
            sums = vectors.new_zeros(self.num_codes, self.dim).index_add_(0, indices, vectors)
            stats = all_reduce_sum(torch.cat([sums, counts[:, None]], dim=1))  # one collective for both
            sums, counts = stats[:, :-1], stats[:, -1]
            self.ema_count.mul_(decay).add_(counts, alpha=1 - decay)
            self.ema_sum.mul_(decay).add_(sums, alpha=1 - decay)
            self.embedding.copy_(self.ema_sum / laplace_smoothed(self.ema_count, self.eps)[:, None])
            return counts
        counts = all_reduce_sum(counts)
        if self.training:
            self.usage.mul_(decay).add_(counts, alpha=1 - decay)
        return counts

    @torch.no_grad()
    def restart_dead_codes(self, vectors: Tensor, generator: torch.Generator | None = None) -> int:
        """Move codes whose usage EMA is below the threshold onto random batch vectors; returns how many.
        The usage statistics are identical on every rank, so every rank agrees on which codes are dead."""
        threshold = self.dead_code_threshold
        usage = self.ema_count if self.update == "ema" else self.usage
        dead = (usage < threshold).nonzero().flatten()
        if threshold <= 0 or dead.numel() == 0:
            return 0
        picked = pick_global_rows(vectors, dead.numel(), generator)
        if picked is None:
            return 0
        self.embedding[dead] = picked.to(self.embedding.dtype)
        usage[dead] = threshold
        if self.update == "ema":
            self.ema_sum[dead] = threshold * picked.to(self.ema_sum.dtype)
        return dead.numel()
