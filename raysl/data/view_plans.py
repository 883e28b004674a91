"""What views to make of an image and every random decision for each: the crop kinds of a
view preset (`Crop`, `ViewSpec`, `view_spec`) and the per-view plans drawn from a row's
`aug_seed` (`plan_views`). Imports neither torch nor OpenCV, so a data task that only
decodes (`decode.PixelTransform`) can draw the plans beside it; `views` applies them on the
CPU, `gpu_views` on the training worker's device.

All randomness of a row comes from one numpy Generator seeded by the row's `aug_seed`, so
a row gives the same views whichever worker or process augments it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from raysl.data.masks import BlockMasks, MultiBlockMasks
from raysl.errors import UserError

EVAL_CROP_FRACTION = 0.875  # eval: resize short side to size / 0.875, centre crop size


@dataclass(frozen=True)
class Crop:
    """One kind of crop and its photometric augmentations; `count` copies of it."""

    size: int
    scale: tuple[float, float]
    count: int = 1
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    gray_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    interpolation: str = "bilinear"  # or "bicubic"

    def min_source_side(self, eval_resize: bool = False) -> int:
        """Shortest source side for which even the smallest crop of this kind needs no upsampling."""
        if eval_resize:
            return math.ceil(self.size / EVAL_CROP_FRACTION)
        # The smallest box RandomResizedCrop samples covers scale[0] of the area with
        # the most extreme aspect ratio; its shorter side is then
        # side * sqrt(scale[0] * min(ratio[0], 1 / ratio[1])) for a square source.
        squeeze = min(self.ratio[0], 1 / self.ratio[1], 1.0)
        return math.ceil(self.size / math.sqrt(self.scale[0] * squeeze))


@dataclass(frozen=True)
class ViewSpec:
    name: str
    crops: tuple[Crop, ...]
    eval_resize: bool = False  # eval: resize short side to size/0.875, centre crop
    # The first n_global views are global crops, the rest local (multi-crop) ones.
    # -1: the crops of the largest size are the global ones (how the presets are written).
    n_global: int = -1
    # Patch masks drawn per row with the views (raysl.data.masks), for the methods that mask.
    masks: BlockMasks | MultiBlockMasks | None = None

    def __post_init__(self):
        if self.n_global < 0:
            big = max(c.size for c in self.crops)
            object.__setattr__(self, "n_global", sum(c.count for c in self.crops if c.size == big))
        if isinstance(self.masks, BlockMasks) and self.masks.views > self.n_views:
            raise ValueError(f"masks.views={self.masks.views}: the views spec {self.name!r} has {self.n_views} views")

    def min_decode_side(self) -> int:
        """Smallest source short side that still needs no upsampling for any crop; passed to
        decode_rgb(min_side=...) so large JPEGs decode at a reduced DCT scale."""
        return max((c.min_source_side(self.eval_resize) for c in self.crops if c.count > 0), default=1)

    @property
    def n_views(self) -> int:
        return sum(c.count for c in self.crops)

    def per_view(self) -> list[Crop]:
        """One Crop per output view, in view order."""
        return [c for c in self.crops for _ in range(c.count)]


# --- presets -----------------------------------------------------------------------

_FLIP_ONLY: dict[str, Any] = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
_SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)  # colour distortion strength s = 1
_BYOL_1 = Crop(224, (0.08, 1.0), blur_p=1.0)
_BYOL_2 = Crop(224, (0.08, 1.0), blur_p=0.1, solarize_p=0.2)
_DINO_GLOBAL: dict[str, Any] = dict(size=224, scale=(0.4, 1.0), interpolation="bicubic")

PRESETS: dict[str, ViewSpec] = {
    "simclr": ViewSpec("simclr", (Crop(224, (0.08, 1.0), count=2, jitter=_SIMCLR_JITTER),)),
    "mocov2": ViewSpec("mocov2", (Crop(224, (0.2, 1.0), count=2, jitter=(0.4, 0.4, 0.4, 0.1)),)),
    "byol": ViewSpec("byol", (_BYOL_1, _BYOL_2)),
    "mocov3": ViewSpec("mocov3", (_BYOL_1, _BYOL_2)),
    "dino": ViewSpec(
        "dino",
        (
            Crop(**_DINO_GLOBAL, blur_p=1.0),
            Crop(**_DINO_GLOBAL, blur_p=0.1, solarize_p=0.2),
            Crop(96, (0.05, 0.4), count=8, blur_p=0.5, interpolation="bicubic"),
        ),
    ),
    "swav": ViewSpec(
        "swav",
        (
            Crop(224, (0.14, 1.0), count=2, jitter=_SIMCLR_JITTER),
            Crop(96, (0.05, 0.14), count=6, jitter=_SIMCLR_JITTER),
        ),
    ),
    # iBOT ViT-S/16 (Zhou et al. 2022): DINO's crops, global scale 0.25-1, 10 local crops 0.05-0.25
    "ibot": ViewSpec(
        "ibot",
        (
            Crop(224, (0.25, 1.0), blur_p=1.0, interpolation="bicubic"),
            Crop(224, (0.25, 1.0), blur_p=0.1, solarize_p=0.2, interpolation="bicubic"),
            Crop(96, (0.05, 0.25), count=10, blur_p=0.5, interpolation="bicubic"),
        ),
    ),
    # DINOv2 (Oquab et al. 2023): global scale 0.32-1, 8 local crops of 98 px (7 patches of 14) 0.05-0.32
    "dinov2": ViewSpec(
        "dinov2",
        (
            Crop(224, (0.32, 1.0), blur_p=1.0, interpolation="bicubic"),
            Crop(224, (0.32, 1.0), blur_p=0.1, solarize_p=0.2, interpolation="bicubic"),
            Crop(98, (0.05, 0.32), count=8, blur_p=0.5, interpolation="bicubic"),
        ),
    ),
    # I-JEPA (Assran et al. 2023): a random resized crop, scale 0.3-1, and nothing else
    "ijepa": ViewSpec("ijepa", (Crop(224, (0.3, 1.0), flip_p=0.0, interpolation="bicubic", **_FLIP_ONLY),)),
    "mae": ViewSpec("mae", (Crop(224, (0.2, 1.0), interpolation="bicubic", **_FLIP_ONLY),)),
    "mae_medical": ViewSpec("mae_medical", (Crop(224, (0.5, 1.0), interpolation="bicubic", **_FLIP_ONLY),)),
    "eval": ViewSpec(
        "eval", (Crop(224, (1.0, 1.0), flip_p=0.0, interpolation="bicubic", **_FLIP_ONLY),), eval_resize=True
    ),
}
# Template for local crops added to a preset that has none (multi-crop for SimCLR etc.).
_DEFAULT_LOCAL: dict[str, Any] = dict(size=96, scale=(0.05, 0.4), blur_p=0.5, solarize_p=0.0)


def _check_size(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 8:
        raise UserError(f"{field}={value!r}: crop size must be an integer >= 8")
    return int(value)


def _check_scale(field: str, value) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{field}={value!r}: expected two numbers (lo, hi)") from exc
    if not (0 < lo <= 1 and 0 < hi <= 1):
        raise UserError(f"{field}={value!r}: scale bounds must lie in (0, 1]")
    if lo > hi:
        raise UserError(f"{field}={value!r}: lo > hi")
    return lo, hi


def _check_count(field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise UserError(f"{field}={value!r}: crop count must be an integer >= 0")
    return int(value)


def _resize_crops(kinds: list[Crop], n: int) -> list[Crop]:
    """n crops made by cycling through the per-view kinds, equal neighbours merged."""
    if not kinds:
        return []
    out: list[Crop] = []
    for i in range(n):
        kind = replace(kinds[i % len(kinds)], count=1)
        if out and replace(out[-1], count=1) == kind:
            out[-1] = replace(out[-1], count=out[-1].count + 1)
        else:
            out.append(kind)
    return out


def view_spec(
    name: str,
    *,
    global_crops: int | None = None,
    local_crops: int | None = None,
    global_size: int | None = None,
    local_size: int | None = None,
    global_scale: tuple[float, float] | None = None,
    local_scale: tuple[float, float] | None = None,
    size: int | None = None,
    scale: tuple[float, float] | None = None,
) -> ViewSpec:
    """A preset with overrides. Global crops are the preset's largest; local ones the rest.
    `size`/`scale` are the same as `global_size`/`global_scale` (single-crop presets).
    A global crop count cycles through the preset's global kinds (DINO: blur, solarize)."""
    if name not in PRESETS:
        raise UserError(f"unknown view preset {name!r}; choose one of: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    for short, long_name, a, b in (
        ("size", "global_size", size, global_size),
        ("scale", "global_scale", scale, global_scale),
    ):
        if a is not None and b is not None and a != b:
            raise UserError(f"{short}={a!r} and {long_name}={b!r} disagree; give one")
    global_size = global_size if global_size is not None else size
    global_scale = global_scale if global_scale is not None else scale
    g_field = "size" if size is not None else "global_size"
    gs_field = "scale" if scale is not None else "global_scale"

    globals_, locals_ = spec.per_view()[: spec.n_global], spec.per_view()[spec.n_global :]
    if global_crops is not None:
        globals_ = _resize_crops(globals_, _check_count("global_crops", global_crops))
    else:
        globals_ = _resize_crops(globals_, len(globals_))
    if local_crops is not None:
        n = _check_count("local_crops", local_crops)
        if not locals_ and n:
            template = spec.crops[0]
            locals_ = [replace(template, count=1, **_DEFAULT_LOCAL)]
        locals_ = _resize_crops(locals_, n)
    else:
        locals_ = _resize_crops(locals_, len(locals_))

    def override(crops, size_field, size_value, scale_field, scale_value):
        if size_value is not None:
            crops = [replace(c, size=_check_size(size_field, size_value)) for c in crops]
        if scale_value is not None:
            crops = [replace(c, scale=_check_scale(scale_field, scale_value)) for c in crops]
        return crops

    globals_ = override(globals_, g_field, global_size, gs_field, global_scale)
    locals_ = override(locals_, "local_size", local_size, "local_scale", local_scale)
    out = ViewSpec(spec.name, tuple(globals_ + locals_), spec.eval_resize, n_global=sum(c.count for c in globals_))
    if out.n_views == 0:
        raise UserError(
            f"view preset {name!r} with global_crops={global_crops}, local_crops={local_crops}: no views left"
        )
    return out


# --- sampling (all randomness) ---------------------------------------------------------

JITTER_NAMES = ("brightness", "contrast", "saturation", "hue")  # Crop.jitter's order, the draw order


@dataclass(frozen=True)
class ViewPlan:
    """Every random decision for one view, drawn before any pixel is touched."""

    # left, top, right, bottom in source pixels: whole pixels for random crops, fractional for the eval box
    box: tuple[float, float, float, float]
    flip: bool
    jitter: tuple[tuple[str, float], ...]  # (op, factor) in the order applied; empty = no jitter
    gray: bool
    blur_sigma: float | None
    solarize: bool


def crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision RandomResizedCrop.get_params, fallback included, as a PIL box."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    top, left = (height - h) // 2, (width - w) // 2
    return left, top, left + w, top + h


def eval_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The source region that 'resize short side to size/0.875, centre crop size' keeps."""
    side = size * min(width, height) / round(size / EVAL_CROP_FRACTION)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def plan_view(rng: np.random.Generator, crop: Crop, width: int, height: int, eval_resize: bool = False) -> ViewPlan:
    if eval_resize:
        return ViewPlan(eval_box(width, height, crop.size), False, (), False, None, False)
    box = crop_box(rng, width, height, crop.scale, crop.ratio)
    flip = bool(rng.random() < crop.flip_p)
    jitter: tuple[tuple[str, float], ...] = ()
    if rng.random() < crop.jitter_p:
        b, c, s, h = crop.jitter
        factors = (  # drawn in JITTER_NAMES' order
            rng.uniform(max(0.0, 1 - b), 1 + b) if b else None,
            rng.uniform(max(0.0, 1 - c), 1 + c) if c else None,
            rng.uniform(max(0.0, 1 - s), 1 + s) if s else None,
            rng.uniform(-h, h) if h else None,
        )
        order = rng.permutation(len(JITTER_NAMES))
        jitter = tuple((JITTER_NAMES[i], float(f)) for i in order if (f := factors[i]) is not None)
    gray = bool(rng.random() < crop.gray_p)
    blur = float(rng.uniform(*crop.blur_sigma)) if rng.random() < crop.blur_p else None
    solarize = bool(rng.random() < crop.solarize_p)
    return ViewPlan(box, flip, jitter, gray, blur, solarize)


def row_rng(aug_seed) -> np.random.Generator:
    return np.random.default_rng(int(aug_seed) & 0xFFFF_FFFF_FFFF_FFFF)


def plan_views(spec: ViewSpec, aug_seed, width: int, height: int) -> list[ViewPlan]:
    """The plans of all views of one row (decoded size width x height), in view order."""
    rng = row_rng(aug_seed)
    return [plan_view(rng, c, width, height, spec.eval_resize) for c in spec.per_view()]


# --- plans as one float array per row (a Ray Data column) ---------------------------

# per view: left, top, right, bottom, flip, gray, blur sigma (NaN: none), solarize,
# jitter count, then (op index, factor) for each of the 4 jitter slots in applied order
PLAN_FIELDS = 9 + 2 * len(JITTER_NAMES)


def encode_plans(rows: list[list[ViewPlan]], views: int) -> np.ndarray:
    """Each row's plans (`views` of them, in view order) -> float64 (rows, views,
    PLAN_FIELDS); decode_plans inverts it."""
    out = np.zeros((len(rows), views, PLAN_FIELDS), dtype=np.float64)
    for r, plans in enumerate(rows):
        for v, p in enumerate(plans):
            jitter = [x for op, f in p.jitter for x in (JITTER_NAMES.index(op), f)]
            blur = np.nan if p.blur_sigma is None else p.blur_sigma
            out[r, v, : 9 + len(jitter)] = (*p.box, p.flip, p.gray, blur, p.solarize, len(p.jitter), *jitter)
    return out


def decode_plans(array: np.ndarray) -> list[list[ViewPlan]]:
    """encode_plans' array -> the same ViewPlans (boxes of random crops as ints, eval boxes as floats)."""
    rows = []
    for row in np.asarray(array).tolist():
        plans = []
        for left, top, right, bottom, flip, gray, blur, solarize, n, *jitter in row:
            box: tuple[float, float, float, float] = (left, top, right, bottom)
            if all(float(x).is_integer() for x in box):
                box = (int(left), int(top), int(right), int(bottom))
            ops = tuple((JITTER_NAMES[int(jitter[2 * i])], jitter[2 * i + 1]) for i in range(int(n)))
            plans.append(ViewPlan(box, bool(flip), ops, bool(gray), None if math.isnan(blur) else blur, bool(solarize)))
        rows.append(plans)
    return rows
