"""Fixed 2-D sine-cosine position embeddings (as in MAE), so positions need no training and no checkpointing."""

import torch
from torch import Tensor


def sincos_pos_embed_1d(dim: int, positions: Tensor) -> Tensor:
    """[len(positions), dim]: sin of position x frequency in the first half, cos in the second.

    Frequencies fall geometrically from 1 to 1/10000, as in the Transformer paper.
    """
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dim, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2))
    angles = positions.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed_2d(grid_h: int, grid_w: int, dim: int, cls_token: bool = False, row_first: bool = False) -> Tensor:
    """[(1 +) grid_h * grid_w, dim] float32 on the CPU, tokens in row-major order (the order of a conv patch embedding).

    By default the first dim/2 channels encode the column, the last dim/2 the row: the layout of the
    MAE and DiT references, so their pretrained weights line up with ours. `row_first` swaps the halves
    (the row in the first half): the table of the MoCo v3 reference. With `cls_token` a zero row comes
    first. Computed in float64 so every device and dtype starts from the same values.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64, device="cpu"),
        torch.arange(grid_w, dtype=torch.float64, device="cpu"),
        indexing="ij",
    )
    halves = [sincos_pos_embed_1d(dim // 2, cols), sincos_pos_embed_1d(dim // 2, rows)]
    embed = torch.cat(halves[::-1] if row_first else halves, dim=1)
    if cls_token:
        embed = torch.cat([torch.zeros(1, dim, dtype=torch.float64, device="cpu"), embed], dim=0)
    return embed.to(torch.float32)
