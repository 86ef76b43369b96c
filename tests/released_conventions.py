"""Direct, functional implementations of the conventions of the released MoCo v3 and DINO code, written
from their papers and code descriptions (not copied), for comparing our modules on the same weights.

Weights are passed as a plain dict in the released layouts' naming (timm-style ViT names), so the same
functions check both our modules and the files `pretrain ckpt import` reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def assert_close(ours: Tensor, reference: Tensor, name: str, tol: float = 1e-4, atol: float = 1e-4) -> None:
    """Equal to float32 precision: the difference is small against the tensor's size (gradients through a
    BatchNorm of a few samples are large, so an elementwise tolerance would measure the wrong thing), or
    both are rounding noise around zero (e.g. the gradient of a bias that a BatchNorm cancels)."""
    error = (ours - reference).norm()
    assert error <= tol * reference.norm() + atol, (
        f"{name}: difference {error.item():.2e}, size {reference.norm().item():.2e}"
    )


def row_first_sincos_table(grid: int, dim: int) -> Tensor:
    """[1 + grid^2, dim]: a zero cls row, then per patch (row-major) sin(row w), cos(row w), sin(col w),
    cos(col w), each dim/4 channels, with w_k = 10000^(-k / (dim/4)): the MoCo v3 table."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows = []
    for r in range(grid):
        for c in range(grid):
            rows.append(torch.cat([(r * omega).sin(), (r * omega).cos(), (c * omega).sin(), (c * omega).cos()]))
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), torch.stack(rows)]).float()


def resample_positions(patch_table: Tensor, grid: int, new_grid: int) -> Tensor:
    """[1, G*G, D] -> [1, g*g, D] as the DINO reference: bicubic with scale factor (g + 0.1) / G."""
    if new_grid == grid:
        return patch_table
    dim = patch_table.shape[-1]
    square = patch_table.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    factor = (new_grid + 0.1) / grid
    out = F.interpolate(square, scale_factor=(factor, factor), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).reshape(1, -1, dim)


def vit_cls(w: dict[str, Tensor], images: Tensor, depth: int, heads: int, patch: int, cls_position: bool) -> Tensor:
    """The cls output of a pre-norm ViT with weights `w` (keys patch_embed.proj.*, cls_token, pos_embed
    [1, N + 1, D], blocks.i.*, norm.*). The table's first row goes to the cls token when `cls_position`
    (DINO, learned), and is a zero row otherwise (MoCo v3, fixed)."""
    x = F.conv2d(images, w["patch_embed.proj.weight"], w["patch_embed.proj.bias"], stride=patch)
    batch, dim, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    table = w["pos_embed"]
    grid = math.isqrt(table.shape[1] - 1)
    x = x + resample_positions(table[:, 1:], grid, gh)
    cls = w["cls_token"] + (table[:, :1] if cls_position else 0)
    x = torch.cat([cls.expand(batch, -1, -1), x], dim=1)
    head_dim = dim // heads
    for i in range(depth):
        p = f"blocks.{i}."
        h = F.layer_norm(x, (dim,), w[p + "norm1.weight"], w[p + "norm1.bias"], eps=1e-6)
        qkv = h @ w[p + "attn.qkv.weight"].T + w[p + "attn.qkv.bias"]
        q, k, v = (t.reshape(batch, -1, heads, head_dim).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
        attn = (q @ k.transpose(-2, -1) * head_dim**-0.5).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, -1, dim)
        x = x + out @ w[p + "attn.proj.weight"].T + w[p + "attn.proj.bias"]
        h = F.layer_norm(x, (dim,), w[p + "norm2.weight"], w[p + "norm2.bias"], eps=1e-6)
        h = F.gelu(h @ w[p + "mlp.fc1.weight"].T + w[p + "mlp.fc1.bias"])
        x = x + h @ w[p + "mlp.fc2.weight"].T + w[p + "mlp.fc2.bias"]
    x = F.layer_norm(x, (dim,), w["norm.weight"], w["norm.bias"], eps=1e-6)
    return x[:, 0]


def moco_mlp(w: dict[str, Tensor], prefix: str, x: Tensor, layers: int) -> Tensor:
    """Linear (no bias) -> BN -> ReLU ... -> Linear -> BN without affine, batch statistics (training mode):
    the released MoCo v3 MLP builder, Sequential indices 0, 1, 2, 3, ... as in its files."""
    index = 0
    for layer in range(layers):
        x = x @ w[f"{prefix}{index}.weight"].T
        index += 1
        last = layer == layers - 1
        weight = None if last else w[f"{prefix}{index}.weight"]
        bias = None if last else w[f"{prefix}{index}.bias"]
        x = F.batch_norm(x, None, None, weight, bias, training=True, eps=1e-5)
        index += 1
        if not last:
            x = F.relu(x)
            index += 1
    return x


def moco_v3_loss(q1: Tensor, q2: Tensor, k1: Tensor, k2: Tensor, temperature: float) -> Tensor:
    def contrast(q: Tensor, k: Tensor) -> Tensor:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.T / temperature
        return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * temperature)

    return contrast(q1, k2) + contrast(q2, k1)


def dino_head(w: dict[str, Tensor], prefix: str, x: Tensor, layers: int) -> Tensor:
    """MLP with GELU (Sequential indices 0, 2, 4), L2 normalize, weight-normalized last layer g v / ||v||."""
    for layer in range(layers):
        x = x @ w[f"{prefix}mlp.{2 * layer}.weight"].T + w[f"{prefix}mlp.{2 * layer}.bias"]
        if layer < layers - 1:
            x = F.gelu(x)
    x = F.normalize(x, dim=-1)
    v = w[f"{prefix}last_layer.weight_v"]
    g = w.get(f"{prefix}last_layer.weight_g", torch.ones(v.shape[0], 1))
    return x @ (g * v / v.norm(dim=1, keepdim=True)).T


def dino_loss(student: list[Tensor], teacher: list[Tensor], center: Tensor, student_temp: float, teacher_temp: float):
    """Cross-entropy of every student view against every teacher (global) view but its own, averaged."""
    total, terms = 0.0, 0
    for t_index, t in enumerate(teacher):
        target = ((t - center) / teacher_temp).softmax(dim=-1)
        for s_index, s in enumerate(student):
            if s_index == t_index:
                continue
            total = total + (-target * (s / student_temp).log_softmax(dim=-1)).sum(-1).mean()
            terms += 1
    return total / terms


def teacher_temperatures(warmup: float, final: float, warmup_epochs: int, epochs: int) -> list[float]:
    """The released per-epoch teacher temperature: linspace over the warm-up epochs, then constant."""
    ramp = (
        [warmup + (final - warmup) * i / (warmup_epochs - 1) for i in range(warmup_epochs)]
        if warmup_epochs > 1
        else [final] * warmup_epochs
    )
    return ramp + [final] * (epochs - warmup_epochs)


def cosine_momentum(base: float, total: int) -> list[float]:
    """The released teacher momentum per iteration, indexed from 0: base at 0, toward 1 over `total`."""
    return [1 + 0.5 * (base - 1) * (1 + math.cos(math.pi * i / total)) for i in range(total)]


def moco_v1_v2_logits(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """The released MoCo v1/v2 forward after the encoders: unit q and k, l_pos = q.k, l_neg = q . queue with
    the queue stored [dim, K], logits [l_pos, l_neg] / T; the loss is cross-entropy against index 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue)
    return torch.cat([l_pos, l_neg], dim=1) / temperature
