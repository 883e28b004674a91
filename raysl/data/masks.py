"""Patch masks drawn per image in the data pipeline, next to the image's views.

- `BlockMasks`: block-wise masking of the global crops, as BEiT (Bao et al. 2021, "BEiT:
  BERT Pre-Training of Image Transformers", `masking_generator.py`) and after it iBOT
  (Zhou et al. 2022) and DINOv2 (Oquab et al. 2023) draw them: 1 = masked patch, where the
  student sees a mask token.
- `MultiBlockMasks`: I-JEPA's multi-block masks (Assran et al. 2023, "Self-Supervised
  Learning from Images with a Joint-Embedding Predictive Architecture",
  `src/masks/multiblock.py`): one context block and a few target blocks, the target
  patches removed from the context.

All randomness of a row's masks comes from `mask_rng(aug_seed)`, a numpy stream apart
from the one its views use (`raysl.data.view_plans.row_rng`): the masks are a function of the
row's seed only, so runs stay deterministic and resumable, and adding masks to a run never
changes its views.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from raysl.errors import UserError

_MASK_STREAM = 0x6D61736B  # "mask": second seed word, so mask_rng never shares row_rng's stream
_PLACEMENT_TRIES = 20  # I-JEPA's timeout: placements tried before the targets are relaxed


def _check_grid(spec) -> None:
    grid = spec.grid
    if len(grid) != 2 or any(isinstance(g, bool) or not isinstance(g, (int, np.integer)) or g < 1 for g in grid):
        raise ValueError(f"grid={grid!r}: expected (rows, cols), integers >= 1")
    object.__setattr__(spec, "grid", (int(grid[0]), int(grid[1])))  # a list or numpy ints compare equal, hash


def _check_range(field: str, value, lo_ok, hi_ok, rule: str) -> None:
    if len(value) != 2 or not (lo_ok(value[0]) and hi_ok(value[1]) and value[0] <= value[1]):
        raise ValueError(f"{field}={value!r}: expected (lo, hi) with {rule}")


def _check_int(field: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{field}={value!r}: expected an integer >= {least}")


@dataclass(frozen=True)
class BlockMasks:
    """BEiT/iBOT/DINOv2 block-wise masks for the first `views` views (the global crops):
    plane v is view v's mask, 1 = masked patch. Each view is masked with `probability`
    (DINOv2's mask_sample_probability; else all zeros); a masked view gets
    round(U(ratio) * rows * cols) patches (iBOT/DINOv2 mask_ratio_min_max) placed as
    rectangles by BEiT's MaskingGenerator. DINOv2 masks exactly int(probability * B) images
    of a batch with stratified ratios; here each view draws on its own, so its mask depends
    on its row's seed only."""

    grid: tuple[int, int]
    views: int
    probability: float = 0.5
    ratio: tuple[float, float] = (0.1, 0.5)
    min_block: int = 4  # BEiT min_num_patches
    aspect: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self):
        _check_grid(self)
        _check_int("views", self.views, 1)
        if not 0 <= self.probability <= 1:
            raise ValueError(f"probability={self.probability!r}: must lie in [0, 1]")
        _check_range("ratio", self.ratio, lambda lo: lo >= 0, lambda hi: hi < 1, "0 <= lo <= hi < 1")
        _check_int("min_block", self.min_block, 1)
        _check_range("aspect", self.aspect, lambda lo: lo > 0, lambda hi: True, "0 < lo <= hi")

    @property
    def planes(self) -> int:
        return self.views


@dataclass(frozen=True)
class MultiBlockMasks:
    """I-JEPA masks: plane 0 = the context (1 = the context encoder sees the patch), planes
    1..targets = target block k (1 = a patch the predictor predicts).

    Target blocks cover U(target_scale) of the grid with aspect (h/w) U(target_aspect) and
    may overlap each other; the context block covers U(context_scale) with aspect
    U(context_aspect), and every target patch is removed from it. Block sizes are drawn per
    image, not per batch as I-JEPA does, so the masks depend on the row's seed only (and a
    batch's images keep different numbers of patches). The fallbacks when the context keeps
    fewer than `min_keep` patches are in `draw_masks`."""

    grid: tuple[int, int]
    targets: int = 4
    target_scale: tuple[float, float] = (0.15, 0.2)
    target_aspect: tuple[float, float] = (0.75, 1.5)
    context_scale: tuple[float, float] = (0.85, 1.0)
    context_aspect: tuple[float, float] = (1.0, 1.0)
    min_keep: int = 10  # fewest context patches; target blocks are grown to it where the grid allows

    def __post_init__(self):
        _check_grid(self)
        _check_int("targets", self.targets, 1)
        for field in ("target_scale", "context_scale"):
            _check_range(field, getattr(self, field), lambda lo: lo > 0, lambda hi: hi <= 1, "0 < lo <= hi <= 1")
        for field in ("target_aspect", "context_aspect"):
            _check_range(field, getattr(self, field), lambda lo: lo > 0, lambda hi: True, "0 < lo <= hi")
        _check_int("min_keep", self.min_keep, 1)
        if self.min_keep > self.grid[0] * self.grid[1]:
            raise ValueError(f"min_keep={self.min_keep}: more than the {self.grid[0]}x{self.grid[1]} grid's patches")

    @property
    def planes(self) -> int:
        return 1 + self.targets


def patch_grid(size: int, patch: int, what: str) -> tuple[int, int]:
    """The (rows, cols) patch grid of a size x size crop cut into patch x patch patches."""
    if size % patch:
        raise UserError(
            f"config key data.image_size: {size} px is not a multiple of the {patch} px patches of {what}; "
            f"use a multiple of {patch}"
        )
    return size // patch, size // patch


def mask_rng(aug_seed) -> np.random.Generator:
    return np.random.default_rng([int(aug_seed) & 0xFFFF_FFFF_FFFF_FFFF, _MASK_STREAM])


def draw_masks(spec: BlockMasks | MultiBlockMasks, aug_seed) -> np.ndarray:
    """The masks of one row: uint8 (spec.planes, rows, cols) of 0/1."""
    rng = mask_rng(aug_seed)
    if isinstance(spec, BlockMasks):
        return np.stack([_block_mask(rng, spec) for _ in range(spec.views)])
    return _multiblock(rng, spec)


# --- BEiT block masking ------------------------------------------------------------


def _block_mask(rng: np.random.Generator, spec: BlockMasks) -> np.ndarray:
    rows, cols = spec.grid
    mask = np.zeros((rows, cols), np.uint8)
    if not rng.random() < spec.probability:
        return mask
    target = round(rng.uniform(*spec.ratio) * rows * cols)
    count = 0
    while count < target:
        added = _add_block(rng, mask, spec, target - count)
        if added == 0:  # BEiT: stop when no block could add a patch
            break
        count += added
    return mask


def _add_block(rng: np.random.Generator, mask: np.ndarray, spec: BlockMasks, most: int) -> int:
    """BEiT MaskingGenerator._mask: up to 10 tries at one block; the patches it newly
    masks, never more than `most`."""
    rows, cols = mask.shape
    log_aspect = (math.log(spec.aspect[0]), math.log(spec.aspect[1]))
    for _ in range(10):
        area = rng.uniform(*sorted((spec.min_block, most)))
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        # BEiT asks for blocks strictly smaller than the grid; on a 1-patch side that
        # would rule out every block, so there a whole side is allowed.
        if 0 < h < max(rows, 2) and 0 < w < max(cols, 2):
            top = int(rng.integers(0, rows - h + 1))
            left = int(rng.integers(0, cols - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            if 0 < new <= most:
                block[:] = 1
                return new
    return 0


# --- I-JEPA multi-block masking ----------------------------------------------------


def _block_size(rng: np.random.Generator, grid: tuple[int, int], scale, aspect, least: int = 1) -> tuple[int, int]:
    """I-JEPA _sample_block_size (scale and aspect drawn apart, where I-JEPA reuses one
    uniform for both), clipped to the grid and grown to at least `least` patches where the
    grid has room."""
    rows, cols = grid
    area = int(rows * cols * rng.uniform(*scale))
    ar = rng.uniform(*aspect)
    h = min(max(int(round(math.sqrt(area * ar))), 1), rows)
    w = min(max(int(round(math.sqrt(area / ar))), 1), cols)
    while h * w < least and (h < rows or w < cols):
        if w < cols and (w <= h or h == rows):
            w += 1
        else:
            h += 1
    return h, w


def _place(rng: np.random.Generator, grid: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    rows, cols = grid
    h, w = size
    top = int(rng.integers(0, rows - h + 1))
    left = int(rng.integers(0, cols - w + 1))
    out = np.zeros(grid, np.uint8)
    out[top : top + h, left : left + w] = 1
    return out


def _multiblock(rng: np.random.Generator, spec: MultiBlockMasks) -> np.ndarray:
    """Targets first, then the context without them (I-JEPA allow_overlap=False). When the
    context keeps fewer than min_keep patches, new places are drawn (`_PLACEMENT_TRIES`);
    then the targets are halved and tried again. I-JEPA instead lets the context overlap
    the targets one by one after each timeout; halving keeps context and targets apart.
    Only when even 1x1 targets leave too little is the context box kept whole (overlapping
    the targets): the masks never come out empty and the loop always ends."""
    sizes = [
        _block_size(rng, spec.grid, spec.target_scale, spec.target_aspect, spec.min_keep) for _ in range(spec.targets)
    ]
    context_size = _block_size(rng, spec.grid, spec.context_scale, spec.context_aspect, spec.min_keep)
    while True:
        for _ in range(_PLACEMENT_TRIES):
            targets = [_place(rng, spec.grid, s) for s in sizes]
            context_box = _place(rng, spec.grid, context_size)
            context = context_box * (1 - np.maximum.reduce(targets))
            if context.sum() >= spec.min_keep:
                return np.stack([context, *targets])
        if all(s == (1, 1) for s in sizes):
            return np.stack([context_box, *targets])
        sizes = [(max(h // 2, 1), max(w // 2, 1)) for h, w in sizes]
