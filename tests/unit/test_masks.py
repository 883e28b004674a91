"""Patch masks (raysl.data.masks): per-row deterministic, the shapes iBOT/DINOv2 and I-JEPA
expect."""

from __future__ import annotations

import dataclasses
import math

import imagefactory
import numpy as np
import pytest
from scipy import ndimage

from raysl.data import view_plans as VP
from raysl.data import views as V
from raysl.data.masks import BlockMasks, MultiBlockMasks, draw_masks, mask_rng, patch_grid
from raysl.errors import UserError

SEEDS = range(400)


def _all_masks(spec, seeds=SEEDS) -> np.ndarray:
    return np.stack([draw_masks(spec, s) for s in seeds])


@pytest.mark.parametrize("spec", [BlockMasks((14, 14), views=2, probability=1.0), MultiBlockMasks((14, 14))])
def test_same_seed_same_masks_different_seed_different_masks(spec):
    a = draw_masks(spec, 7)
    assert a.dtype == np.uint8 and a.shape == (spec.planes, 14, 14)
    assert set(np.unique(a)) <= {0, 1}
    assert np.array_equal(a, draw_masks(spec, np.int64(7)))
    assert not np.array_equal(a, draw_masks(spec, 8))
    assert np.array_equal(draw_masks(spec, -3), draw_masks(spec, -3))  # int64 seeds may be negative
    assert len({draw_masks(spec, s).tobytes() for s in range(50)}) == 50


def test_mask_stream_is_not_the_view_stream():
    assert not np.array_equal(mask_rng(5).random(8), VP.row_rng(5).random(8))


# ---------------------------------------------------------------- BEiT / iBOT / DINOv2 block masks


@pytest.mark.parametrize("grid", [(14, 14), (16, 20)])
def test_block_masks_cover_the_ratio_range(grid):
    spec = BlockMasks(grid, views=2, probability=1.0, ratio=(0.1, 0.5))
    n = grid[0] * grid[1]
    fractions = _all_masks(spec).reshape(len(SEEDS) * 2, n).mean(axis=1)
    # Above: the target is round(ratio * n) and BEiT never masks past it. Below: BEiT stops
    # when ten blocks in a row add nothing, which happens once fewer than min_block patches
    # are left (the block area is then drawn between those and min_block, and most such
    # blocks land on masked patches): seen up to 3 patches short over 5000 seeds.
    assert fractions.max() <= 0.5 + 0.5 / n
    assert fractions.min() >= 0.1 - (0.5 + spec.min_block) / n
    assert fractions.min() < 0.15 and fractions.max() > 0.45  # the whole range is used


def test_about_probability_of_the_views_are_masked():
    spec = BlockMasks((14, 14), views=2, probability=0.3)
    masked = _all_masks(spec, range(1000)).any(axis=(2, 3))  # ratio >= 0.1: a masked view has patches
    n = masked.size
    assert abs(masked.mean() - 0.3) < 5 * math.sqrt(0.3 * 0.7 / n)  # 5 binomial standard deviations
    assert 0.2 < masked[:, 0].mean() < 0.4 and 0.2 < masked[:, 1].mean() < 0.4  # each view draws its own
    assert masked[:, 0].tolist() != masked[:, 1].tolist()


def test_probability_zero_masks_nothing():
    assert not _all_masks(BlockMasks((14, 14), views=2, probability=0.0), range(100)).any()


def test_block_masks_are_made_of_blocks():
    """BEiT masks rectangles of >= min_block patches: few large connected pieces. Scattered
    masking of the same fractions gives pieces of ~2.5 patches and many isolated ones."""
    planes = _all_masks(BlockMasks((14, 14), views=2, probability=1.0)).reshape(-1, 14, 14)
    pieces = sum(ndimage.label(p)[1] for p in planes)
    assert planes.sum() / pieces > 8
    padded = np.pad(planes, ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    isolated = ((planes == 1) & (neighbours == 0)).sum()
    assert isolated < 0.02 * planes.sum()


# ---------------------------------------------------------------- I-JEPA multi-block masks


def _rectangle(plane: np.ndarray) -> tuple[int, int] | None:
    """(h, w) when the ones of `plane` fill one rectangle, else None."""
    rows, cols = np.nonzero(plane)
    if not len(rows):
        return None
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    return (h, w) if h * w == len(rows) else None


@pytest.mark.parametrize("grid", [(14, 14), (12, 18)])
def test_multiblock_context_and_targets(grid):
    spec = MultiBlockMasks(grid)
    n = grid[0] * grid[1]
    masks = _all_masks(spec)
    assert masks.shape == (len(SEEDS), 5, *grid)
    context, targets = masks[:, 0], masks[:, 1:]
    assert (context.sum(axis=(1, 2)) >= spec.min_keep).all()
    assert not (context & targets.max(axis=1)).any()  # no target patch is in the context
    for target in targets.reshape(-1, *grid):
        size = _rectangle(target)
        assert size is not None
        h, w = size
        # int(scale * n) patches asked for; rounding h and w moves the area by at most
        # (h + w) / 2 + 1/4 patches
        slack = (h + w) / 2 + 0.25
        assert spec.target_scale[0] * n - 1 - slack <= h * w <= spec.target_scale[1] * n + slack
        # and the aspect h / w: h and w are each rounded by at most 1/2
        assert (h - 0.5) / (w + 0.5) <= spec.target_aspect[1] and (h + 0.5) / (w - 0.5) >= spec.target_aspect[0]
    # targets are placed apart (they may overlap) and cover the grid over many images
    assert (targets[:, 0] != targets[:, 1]).any(axis=(1, 2)).mean() > 0.9
    assert targets.max(axis=(0, 1)).all()


def test_multiblock_context_is_one_block_less_the_targets():
    for m in _all_masks(MultiBlockMasks((14, 14)), range(100)):
        context, covered = m[0], m[1:].max(axis=0)
        rows, cols = np.nonzero(context)
        box = np.zeros_like(context)
        box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = 1
        assert np.array_equal(context, box & (1 - covered))


def test_multiblock_never_spins_nor_comes_out_empty():
    # Targets that cover the grid leave no context: the masks still come, non-empty.
    spec = MultiBlockMasks((4, 4), targets=4, target_scale=(0.9, 1.0), context_scale=(0.2, 0.3), min_keep=3)
    for m in _all_masks(spec, range(50)):
        assert m[0].sum() >= 1 and (m[1:].sum(axis=(1, 2)) >= 1).all()
    # A small grid: target blocks are grown to min_keep patches
    spec = MultiBlockMasks((8, 8), target_scale=(0.1, 0.12), min_keep=10)
    assert (_all_masks(spec, range(50))[:, 1:].sum(axis=(2, 3)) >= 10).all()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "make, field",
    [
        (lambda: BlockMasks((0, 14), 2), "grid"),
        (lambda: BlockMasks((14, 14), 0), "views"),
        (lambda: BlockMasks((14, 14), 2, probability=1.5), "probability"),
        (lambda: BlockMasks((14, 14), 2, ratio=(0.5, 0.1)), "ratio"),
        (lambda: BlockMasks((14, 14), 2, ratio=(0.1, 1.0)), "ratio"),
        (lambda: BlockMasks((14, 14), 2, min_block=0), "min_block"),
        (lambda: BlockMasks((14, 14), 2, aspect=(0.0, 3.0)), "aspect"),
        (lambda: MultiBlockMasks((14,)), "grid"),
        (lambda: MultiBlockMasks((14, 14), targets=0), "targets"),
        (lambda: MultiBlockMasks((14, 14), target_scale=(0.0, 0.2)), "target_scale"),
        (lambda: MultiBlockMasks((14, 14), context_scale=(0.85, 1.1)), "context_scale"),
        (lambda: MultiBlockMasks((14, 14), target_aspect=(1.5, 0.75)), "target_aspect"),
        (lambda: MultiBlockMasks((14, 14), context_aspect=(-1.0, 1.0)), "context_aspect"),
        (lambda: MultiBlockMasks((3, 3), min_keep=10), "min_keep"),
    ],
)
def test_bad_fields_are_named(make, field):
    with pytest.raises(ValueError, match=f"^{field}="):
        make()


def test_a_grid_given_as_a_list_is_kept_as_a_tuple():
    assert BlockMasks([np.int64(14), 14], 2) == BlockMasks((14, 14), 2)
    assert hash(MultiBlockMasks([8, 8])) == hash(MultiBlockMasks((8, 8)))


def test_patch_grid():
    assert patch_grid(224, 16, "vit_small_patch16_224") == (14, 14)
    with pytest.raises(UserError, match="data.image_size.*100.*16"):
        patch_grid(100, 16, "vit_small_patch16_224")


def test_block_masks_for_more_views_than_the_spec_has_are_refused():
    with pytest.raises(ValueError, match="masks.views"):
        dataclasses.replace(VP.view_spec("mae"), masks=BlockMasks((14, 14), views=2))


# ---------------------------------------------------------------- views + masks


def _batch(images: list[bytes]) -> dict:
    column = np.empty(len(images), dtype=object)
    column[:] = images
    return {
        "image": column,
        "aug_seed": np.array([11, -4, 2**40, 5][: len(images)], dtype=np.int64),
        "key": np.array([f"img/{i}" for i in range(len(images))]),
    }


def test_views_are_the_same_with_and_without_masks():
    jpeg = imagefactory.encode(imagefactory.photo(120), "JPEG", quality=90)
    png = imagefactory.encode(imagefactory.photo(100).rotate(90, expand=True), "PNG")
    batch = _batch([jpeg, jpeg[:60], png, jpeg])  # row 1: truncated, dropped
    plain = VP.view_spec("dino", global_size=64, local_size=32, local_crops=2)
    masked = dataclasses.replace(plain, masks=BlockMasks((4, 4), views=2, probability=1.0))
    without, with_ = V.ViewTransform(plain)(batch), V.ViewTransform(masked)(batch)
    assert sorted(with_) == sorted([*without, "masks"])
    for name, col in without.items():
        assert np.array_equal(col, with_[name]) and col.dtype == with_[name].dtype, name
    assert list(with_["key"]) == ["img/0", "img/2", "img/3"]
    assert with_["masks"].dtype == np.uint8 and with_["masks"].shape == (3, 2, 4, 4)
    for got, seed in zip(with_["masks"], batch["aug_seed"][[0, 2, 3]]):
        assert np.array_equal(got, draw_masks(masked.masks, seed))


def test_an_all_corrupt_batch_gives_an_empty_masks_column():
    spec = dataclasses.replace(VP.view_spec("mae", size=32), masks=MultiBlockMasks((8, 8), min_keep=4))
    out = V.ViewTransform(spec)(_batch([b"", b"junk"]))
    assert out["masks"].shape == (0, 5, 8, 8) and out["view_0"].shape == (0, 3, 32, 32)


def test_spec_for_attaches_the_methods_masks_on_both_paths():
    from raysl.config import load_config
    from raysl.methods.base import method_class
    from raysl.train.run_views import spec_for

    assert method_class("dino").mask_spec(None, None) is None  # the default: no masks
    for name in ("mae", "dino"):  # only global crops / with local crops: two paths through spec_for
        cls = method_class(name)
        cfg = load_config("quickstart", [f"method.name={name}", "data.views=", "data.image_size=0"])
        want = MultiBlockMasks(patch_grid(224, 16, name))
        masked_cls = type(f"Masked{name}", (cls,), {"mask_spec": classmethod(lambda c, cfg, spec: want)})
        spec = spec_for(cfg, masked_cls)
        assert spec.masks == want
        assert dataclasses.replace(spec, masks=None) == spec_for(cfg, cls)
