"""Heads of the self-supervised methods: projection and prediction MLPs (MoCo, SimCLR), the DINO head, the pretext tasks' classifier."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.distributed import all_reduce_sum_grad
from pretrain.models.transformer import init_linear_and_norm


class GlobalBatchNorm1d(nn.Module):
    """BatchNorm over the batch of all ranks, always with batch statistics.

    MoCo v3's heads use synchronized BN; summing moments across ranks (differentiably) gives the same
    normalization at any world size and on any engine. Heads are only used in training, so there are no
    running statistics (and no buffers to checkpoint).
    """

    def __init__(self, dim: int, affine: bool = True, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32, or fp64 for fp64 inputs
        moments = torch.cat([xf.sum(0), (xf**2).sum(0), xf.new_full((1,), x.shape[0])])
        moments = all_reduce_sum_grad(moments)
        dim = x.shape[1]
        count = moments[-1]
        mean = moments[:dim] / count
        var = (moments[dim : 2 * dim] / count - mean**2).clamp_min(0)
        out = ((xf - mean) * torch.rsqrt(var + self.eps)).to(x.dtype)
        if self.weight is not None:
            out = out * self.weight + self.bias
        return out


def classifier_head(in_dim: int, hidden_dim: int, classes: int) -> nn.Module:
    """The pretext tasks' head: a linear classifier, or Linear -> GELU -> Linear with `hidden_dim` > 0."""
    if hidden_dim == 0:
        return nn.Linear(in_dim, classes)
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, classes))


def moco_mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool) -> nn.Sequential:
    """Linear (no bias) -> BN -> ReLU ... -> Linear [-> BN without affine], as in MoCo v3."""
    layers: list[nn.Module] = []
    for index in range(num_layers):
        last = index == num_layers - 1
        dim_in = in_dim if index == 0 else hidden_dim
        dim_out = out_dim if last else hidden_dim
        layers.append(nn.Linear(dim_in, dim_out, bias=False))
        if not last:
            layers += [GlobalBatchNorm1d(dim_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(GlobalBatchNorm1d(dim_out, affine=False))
    return nn.Sequential(*layers)


class WeightNormLinear(nn.Module):
    """y = x W^T with rows W = g * v / ||v|| (no bias); with `fixed_norm`, g is 1 and not a parameter.

    Written out rather than through torch's parametrizations so parameter names stay plain for
    sharding and checkpoints. `grad_scale` 0 freezes the layer while keeping it in the graph: the
    gradient is exactly zero (so Adam's update is too) and every engine still sees the parameter used.
    """

    def __init__(self, in_dim: int, out_dim: int, fixed_norm: bool) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = None if fixed_norm else nn.Parameter(torch.ones(out_dim, 1))

    def forward(self, x: Tensor, grad_scale: float | Tensor = 1.0) -> Tensor:
        v, g = self.weight_v, self.weight_g
        if isinstance(grad_scale, Tensor) or grad_scale != 1.0:
            v = v.detach() + (v - v.detach()) * grad_scale
            g = None if g is None else g.detach() + (g - g.detach()) * grad_scale
        weight = F.normalize(v, dim=1)
        if g is not None:
            weight = weight * g
        return x @ weight.T


LAST_LAYER_INITS = ("linear_default", "trunc_normal")


class DINOHead(nn.Module):
    """MLP (GELU) -> bottleneck -> L2 normalize -> weight-normalized linear to `out_dim` prototypes.

    The last layer's direction v starts as nn.Linear's default (`linear_default`, the DINO reference:
    the norm of v sets the size of its updates) or truncated-normal 0.02 (`trunc_normal`)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        norm_last_layer: bool = True,
        last_layer_init: str = "trunc_normal",
    ) -> None:
        super().__init__()
        if last_layer_init not in LAST_LAYER_INITS:
            raise ValueError(f"unknown last_layer_init {last_layer_init!r}; expected one of {LAST_LAYER_INITS}")
        self.last_layer_init = last_layer_init
        if num_layers < 1:
            raise ValueError(f"DINOHead needs num_layers >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for index, (dim_in, dim_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(dim_in, dim_out))
            if index < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim, fixed_norm=norm_last_layer)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        v = self.last_layer.weight_v
        if self.last_layer_init == "linear_default":
            bound = 1 / math.sqrt(v.shape[1])  # what nn.Linear.reset_parameters draws for a weight
            nn.init.uniform_(v, -bound, bound)
        else:
            nn.init.trunc_normal_(v, std=0.02)
        if self.last_layer.weight_g is not None:
            nn.init.ones_(self.last_layer.weight_g)

    def forward(self, x: Tensor, freeze_last_layer: bool | Tensor = False) -> Tensor:
        """`freeze_last_layer` may be a bool tensor, so a schedule can decide it without a host sync."""
        x = F.normalize(self.mlp(x), dim=-1)
        if isinstance(freeze_last_layer, Tensor):
            return self.last_layer(x, grad_scale=(~freeze_last_layer).to(x.dtype))
        return self.last_layer(x, grad_scale=0.0 if freeze_last_layer else 1.0)


@torch.no_grad()
def init_moco_mlp(mlp: nn.Module) -> None:
    mlp.apply(init_linear_and_norm)
    for module in mlp.modules():
        if isinstance(module, GlobalBatchNorm1d) and module.weight is not None:
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
