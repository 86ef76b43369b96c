"""BatchNorm over fixed-size groups of the batch: MoCo v1/v2's per-GPU BatchNorm, made independent of the
world size.

The released MoCo normalizes each GPU's 32 images by their own statistics (plain BN under DDP), and shuffle
BN relies on that: the key encoder must not normalize an image together with the images its query was
normalized with. Tying the groups to GPUs would make a run change with the number of processes, so the
group size is a setting instead: training-mode statistics are those of each run of `group_size`
consecutive samples, wherever they live. A rank's batch is a whole number of groups, so normalization
needs no communication; only the running statistics (used in eval: kNN, linear probe, export) are
averaged over every group of every rank, so all ranks hold the same buffers at any world size.

The engines leave this layer alone (it is not an `nn.BatchNorm2d`, which they make global); its parameters
and buffers are BatchNorm's, under the same names, so torchvision weights load and export by name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import all_reduce_sum


class GroupBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch statistics per group of `group_size` samples; any input rank (N, C, ...)."""

    def __init__(self, num_features: int, group_size: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None) -> None:  # fmt: skip
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if group_size < 1:
            raise ValueError(f"GroupBatchNorm group_size must be >= 1, got {group_size}")
        self.group_size = group_size

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GroupBatchNorm expects (N, C, ...) input, got {x.dim()}-D")
        if self.training and x.shape[0] % self.group_size:  # eval mode reads running statistics: any batch
            raise ValueError(
                f"GroupBatchNorm: a batch of {x.shape[0]} is not a whole number of groups of {self.group_size}"
            )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_size={self.group_size}"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not (self.training or not self.track_running_stats):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        channels, groups = x.shape[1], x.shape[0] // self.group_size
        xf = x.to(torch.promote_types(x.dtype, torch.float32)).reshape(groups, self.group_size, channels, -1)
        mean = xf.mean(dim=(1, 3), keepdim=True)
        var = (xf - mean).square().mean(dim=(1, 3), keepdim=True)  # biased, as BatchNorm normalizes with
        if self.training and self.track_running_stats:
            per_group = self.group_size * xf.shape[3]
            self._update_running_stats(
                mean.detach().flatten(1), var.detach().flatten(1) * per_group / max(1, per_group - 1)
            )
        out = (xf - mean) * torch.rsqrt(var + self.eps)
        out = out.reshape(x.shape)
        if self.affine:
            shape = [1, channels] + [1] * (x.dim() - 2)
            out = out * self.weight.to(out.dtype).view(shape) + self.bias.to(out.dtype).view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, means: Tensor, unbiased_vars: Tensor) -> None:
        """Move toward the mean over every group of every rank of its mean and unbiased variance: what each
        GPU's BN would track, averaged, so the buffers agree across ranks."""
        totals = torch.cat([means.sum(0), unbiased_vars.sum(0), means.new_full((1,), means.shape[0])])
        totals = all_reduce_sum(totals)
        channels = means.shape[1]
        groups = totals[-1]
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.lerp_((totals[:channels] / groups).to(self.running_mean.dtype), factor)
        self.running_var.lerp_((totals[channels : 2 * channels] / groups).to(self.running_var.dtype), factor)


def replace_batch_norms(module: nn.Module, replace: Callable[[nn.Module], bool], make) -> nn.Module:
    """Every BatchNorm under `module` for which `replace(bn)` holds becomes `make(bn)`, an instance of another
    `_BatchNorm` class that then holds the same parameters and buffers (so names, checkpoints and optimizer
    state are unchanged), in place; returns `module` (or the replacement when `module` itself is one)."""
    if replace(module):
        converted = make(module)
        converted.training = module.training
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        if module.track_running_stats:
            converted.running_mean, converted.running_var = module.running_mean, module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted
    for name, child in module.named_children():
        replaced = replace_batch_norms(child, replace, make)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def convert_to_group_batch_norm(module: nn.Module, group_size: int) -> nn.Module:
    """Every `nn.BatchNorm1d/2d/3d` under `module` becomes a `GroupBatchNorm` of `group_size` (see
    `replace_batch_norms`)."""
    return replace_batch_norms(
        module,
        lambda m: isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)),
        lambda m: GroupBatchNorm(m.num_features, group_size, m.eps, m.momentum, m.affine, m.track_running_stats),
    )
