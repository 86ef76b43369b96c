"""iBOT's block-wise masks as DINOv2 draws them (dinov2/data/masking.py and collate.py): rectangles of
random area and aspect ratio added until a per-image target count of patches is reached, with the targets
of a batch spread over [ratio_min, ratio_max] in equal strata.

Random numbers come from torch CPU generators seeded from the run's seed, the step and the crop's row in
the global batch (`ibot_masks`), so masks replay on resume and N ranks draw what one process draws on the
whole batch. The released code uses Python's `random` per rank's batch; the draws are the same
distributions, stratified over the global batch instead of each rank's, not the same numbers."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from data_pipeline.reader import derive_seed


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(low: int, high: int, generator: torch.Generator | None) -> int:
    """Uniform on [low, high], both included (random.randint)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


class BlockMasking:
    """Masks [grid, grid] of rectangles: each of area uniform in [min_patches, the patches still to mask]
    (at most `max_patches`) and log-uniform aspect ratio in [min_aspect, 1 / min_aspect]; a rectangle only
    counts if it adds patches without exceeding the target; 10 tries per rectangle (DINOv2's defaults:
    min_patches 4, min_aspect 0.3, max_patches half the grid)."""

    def __init__(
        self, grid: int, min_patches: int = 4, max_patches: float | None = None, min_aspect: float = 0.3
    ) -> None:
        if grid < 1 or min_patches < 1 or not 0 < min_aspect <= 1:
            raise ValueError(f"bad block masking: grid {grid}, min_patches {min_patches}, min_aspect {min_aspect}")
        self.grid = grid
        self.min_patches = min_patches
        self.max_patches = 0.5 * grid * grid if max_patches is None else max_patches
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def add_block(self, mask: Tensor, max_new: float, generator: torch.Generator | None = None) -> int:
        """Try up to 10 rectangles; mask the first that adds between 1 and `max_new` patches. -> patches added."""
        for _ in range(10):
            area = _uniform(self.min_patches, max_new, generator)
            aspect = math.exp(_uniform(*self.log_aspect, generator))
            height = int(round(math.sqrt(area * aspect)))
            width = int(round(math.sqrt(area / aspect)))
            if width < self.grid and height < self.grid:
                top = _randint(0, self.grid - height, generator)
                left = _randint(0, self.grid - width, generator)
                block = mask[top : top + height, left : left + width]
                added = height * width - int(block.sum())
                if 0 < added <= max_new:
                    block.fill_(True)
                    return added
        return 0

    def __call__(self, num_patches: int, generator: torch.Generator | None = None) -> Tensor:
        """A mask with at most `num_patches` patches set (fewer when no rectangle fits the remainder)."""
        mask = torch.zeros(self.grid, self.grid, dtype=torch.bool)
        count = 0
        while count < num_patches:
            added = self.add_block(mask, min(num_patches - count, self.max_patches), generator)
            if added == 0:
                break
            count += added
        return mask


def ibot_masks(
    rows: range,
    total: int,
    masking: BlockMasking,
    probability: float = 0.5,
    ratio: tuple[float, float] = (0.1, 0.5),
    seed: int = 0,
) -> Tensor:
    """[len(rows), grid * grid] masks (True = masked) for `rows` of a batch of `total` global crops: int(total x
    probability) of the crops masked, the i-th with a target ratio uniform in the i-th of equal strata of
    `ratio`, the rest empty, the strata dealt to crops in a random order (DINOv2's collate_data_and_cast).

    Which crop gets which stratum comes from `seed`, and each crop's mask from (seed, its row): a rank
    drawing its own rows of the global batch gets what one process drawing all of them gets."""
    if not 0 <= probability <= 1 or not 0 <= ratio[0] <= ratio[1] <= 1:
        raise ValueError(f"bad iBOT masking: probability {probability}, ratio {ratio}")
    if rows.start < 0 or rows.stop > total:
        raise ValueError(f"rows {rows} outside a batch of {total}")
    patches = masking.grid * masking.grid
    masked = int(total * probability)
    bounds = torch.linspace(ratio[0], ratio[1], masked + 1).tolist()
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    stratum = torch.empty_like(order)
    stratum[order] = torch.arange(total)
    masks = []
    for row in rows:
        k = int(stratum[row])
        if k >= masked:
            masks.append(torch.zeros(masking.grid, masking.grid, dtype=torch.bool))
            continue
        generator = torch.Generator().manual_seed(derive_seed(seed, "row", row))
        masks.append(masking(int(patches * _uniform(bounds[k], bounds[k + 1], generator)), generator))
    return torch.stack(masks).flatten(1) if masks else torch.zeros(0, patches, dtype=torch.bool)
