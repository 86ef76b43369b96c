"""BatchNorm over the global batch: what every engine makes of a method's `nn.BatchNorm*d` layers.

torch's `nn.SyncBatchNorm` only runs on accelerators (it rejects CPU tensors, so gloo runs cannot use
it) and is not what DeepSpeed or FSDP2 convert by themselves. `GlobalBatchNorm` is a `_BatchNorm` with
the same parameters and buffers (weight, bias, running_mean, running_var, num_batches_tracked), whose
training-mode statistics span every rank: each rank's count, per-channel mean and sum of squared
deviations (two passes, in at least fp32) are all-gathered with gradients and combined exactly, as
`nn.SyncBatchNorm` does. On one process the gather is a no-op, so a model behaves the same at any world
size and on any engine. Eval mode uses the running statistics, as `nn.BatchNorm`.
The running variance is updated with the unbiased global variance, as torch does with its local one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import all_gather_cat_grad
from pretrain.models.group_batch_norm import replace_batch_norms


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch moments of every rank; any input rank (N, C, ...) like `nn.SyncBatchNorm`."""

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        use_batch = self.training or not self.track_running_stats
        if not use_batch:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        channels = x.shape[1]
        dims = [0, *range(2, x.dim())]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        # Each rank's count, mean and sum of squared deviations (two passes, no cancellation), gathered and
        # combined exactly (Chan et al.): the same statistics as one process over the global batch.
        local_mean = xf.mean(dims)
        local_m2 = (xf - local_mean.view(1, channels, *[1] * (x.dim() - 2))).square().sum(dims)
        local_count = xf.new_full((1,), float(x.numel() // channels))
        stats = all_gather_cat_grad(torch.cat([local_count, local_mean, local_m2])[None])
        counts, means, m2s = stats[:, :1], stats[:, 1 : channels + 1], stats[:, channels + 1 :]
        count = counts.sum()
        mean = (counts * means).sum(0) / count
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / count
        if self.training and self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), count.detach())
        shape = [1, channels] + [1] * (x.dim() - 2)
        out = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.to(xf.dtype).view(shape) + self.bias.to(xf.dtype).view(shape)
        return out.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            factor = self.momentum
        unbiased = var * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def convert_to_global_batch_norm(module: nn.Module) -> nn.Module:
    """Every `nn.BatchNorm1d/2d/3d` (not already global) becomes a `GlobalBatchNorm` holding the same
    tensors, in place; returns `module` (or the replacement when `module` itself is a BatchNorm). Other
    `_BatchNorm` kinds (MoCo's `GroupBatchNorm`) keep their own statistics."""
    batch_norms = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return replace_batch_norms(
        module,
        lambda m: isinstance(m, batch_norms) and not isinstance(m, GlobalBatchNorm),
        lambda m: GlobalBatchNorm(
            m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, device=_device_of(m)
        ),
    )


def has_batch_norm(module: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def _device_of(module: nn.Module) -> torch.device | None:
    for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
        return tensor.device
    return None
