"""Augmentation views for SSL methods: encoded bytes in, uint8 CHW crops out.

Everything stays in uint8: each image is decoded once, each crop is cut and resized
straight from the decoded pixels by torch's uint8 antialiased resize (SIMD, about
3x PIL's; the same filter as PIL's), and the colour ops run on the small crop with
OpenCV's uint8 SIMD kernels (torchvision's PIL ops, one pass each): on CPU this is an
order of magnitude faster than float tensor ops (DATA.md). Normalisation to float
happens on the training worker (`normalize`).

All randomness of a row comes from one numpy Generator seeded by the row's `aug_seed`,
so a row gives the same views whichever worker or process augments it. Drawing the
random parameters (`plan_view`) is kept apart from applying them (`apply_view`), so
tests can see which ops a view would get without looking at pixels.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate

from raysl.data.decode import decodable_rows, decode_pixels, kept_columns
from raysl.data.masks import BlockMasks, MultiBlockMasks, draw_masks
from raysl.errors import UserError

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875  # eval: resize short side to size / 0.875, centre crop size
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


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

_FLIP_ONLY = dict(jitter_p=0.0, gray_p=0.0, blur_p=0.0)
_SIMCLR_JITTER = (0.8, 0.8, 0.8, 0.2)  # colour distortion strength s = 1
_BYOL_1 = Crop(224, (0.08, 1.0), blur_p=1.0)
_BYOL_2 = Crop(224, (0.08, 1.0), blur_p=0.1, solarize_p=0.2)
_DINO_GLOBAL = dict(size=224, scale=(0.4, 1.0), interpolation="bicubic")

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
_DEFAULT_LOCAL = dict(size=96, scale=(0.05, 0.4), blur_p=0.5, solarize_p=0.0)


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


# --- sampling (all randomness) and applying (no randomness) ------------------------


@dataclass(frozen=True)
class ViewPlan:
    """Every random decision for one view, drawn before any pixel is touched."""

    box: tuple[int, int, int, int]  # left, top, right, bottom in source pixels
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
        factors = {
            "brightness": rng.uniform(max(0.0, 1 - b), 1 + b) if b else None,
            "contrast": rng.uniform(max(0.0, 1 - c), 1 + c) if c else None,
            "saturation": rng.uniform(max(0.0, 1 - s), 1 + s) if s else None,
            "hue": rng.uniform(-h, h) if h else None,
        }
        order = rng.permutation(4)
        names = list(factors)
        jitter = tuple((names[i], float(factors[names[i]])) for i in order if factors[names[i]] is not None)
    gray = bool(rng.random() < crop.gray_p)
    blur = float(rng.uniform(*crop.blur_sigma)) if rng.random() < crop.blur_p else None
    solarize = bool(rng.random() < crop.solarize_p)
    return ViewPlan(box, flip, jitter, gray, blur, solarize)


def pixels_of(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) uint8 tensor in channels-last memory (no planar copy)."""
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)


def _crop(img: Image.Image | None, pixels: torch.Tensor, box, crop: Crop) -> np.ndarray:
    """Cut `box` out of the source and resize it to crop.size x crop.size: (size, size, 3) uint8.

    Whole-pixel boxes (every RandomResizedCrop box, always inside the image) go through
    torch's uint8 antialiased resize, which keeps the channels-last source as it is and
    uses the same filters as PIL (mean absolute difference ~0.02 grey levels): what
    torchvision's `resized_crop` runs, called without importing torchvision, which costs
    every fresh data worker about 1.6 s of CPU. Fractional boxes (the eval view) use
    PIL, which takes them."""
    if all(float(v).is_integer() for v in box):
        left, top, right, bottom = (int(v) for v in box)
        out = pixels[:, top:bottom, left:right]
        if out.shape[1:] != (crop.size, crop.size):
            out = _resize(out, crop.size, crop.interpolation)
        return np.ascontiguousarray(out.permute(1, 2, 0).numpy())
    if img is None:
        img = Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")
    return np.asarray(img.resize((crop.size, crop.size), _RESAMPLE[crop.interpolation], box=box))


def _resize(chw: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """uint8 (3, h, w) -> (3, size, size), antialiased, as torchvision's resize_image on CPU."""
    x = chw.unsqueeze(0)
    if chw.stride(0) == 1:
        # A box cut from HWC pixels. torch picks a planar output, and its slower planar
        # kernel, unless the batch stride (of a batch of one) is the outermost (pytorch#68430):
        # with this one the output stays channels-last and the HWC view of it needs no copy
        # (a 224 px view: 274 -> 98 us, the same pixels).
        x = x.as_strided(x.shape, (chw.shape[1] * chw.stride(1), *x.stride()[1:]))
    return interpolate(x, size=[size, size], mode=mode, align_corners=False, antialias=True)[0]


# The colour ops on (H, W, 3) uint8 arrays with OpenCV: each is torchvision's PIL op
# (ImageEnhance blends, HSV hue shift, ITU-R 601 grey, threshold solarize) computed in one
# SIMD pass, where PIL builds several intermediate images per op. PIL truncates a blend's
# result to an integer and OpenCV rounds, so the blends subtract just under half a level
# first (_FLOOR): the same pixels, without a +0.5-level bias per op. The blur is a true
# Gaussian (as torchvision's GaussianBlur and BYOL's code), where PIL chains box blurs.
_FLOOR = -0.4999


def _grey(a: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(a, cv2.COLOR_RGB2GRAY)


def brightness(a: np.ndarray, factor: float) -> np.ndarray:
    return cv2.convertScaleAbs(a, alpha=factor, beta=_FLOOR)  # |x| only moves values that end at 0


def contrast(a: np.ndarray, factor: float) -> np.ndarray:
    mean = int(_grey(a).mean() + 0.5)  # PIL: blend with a flat image of the grey mean
    return cv2.addWeighted(a, factor, a, 0.0, (1.0 - factor) * mean + _FLOOR)


def saturation(a: np.ndarray, factor: float) -> np.ndarray:
    return cv2.addWeighted(a, factor, cv2.cvtColor(_grey(a), cv2.COLOR_GRAY2RGB), 1.0 - factor, _FLOOR)


def hue(a: np.ndarray, factor: float) -> np.ndarray:
    """torchvision's adjust_hue: shift H in uint8 HSV (H in 0..255) with wrap-around."""
    hsv = cv2.cvtColor(a, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(factor * 255) % 256)  # uint8 wraps
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


_JITTER = {"brightness": brightness, "contrast": contrast, "saturation": saturation, "hue": hue}
_SOLARIZE = np.where(np.arange(256) >= 128, 255 - np.arange(256), np.arange(256)).astype(np.uint8)


def apply_view(img: Image.Image | None, plan: ViewPlan, crop: Crop, pixels: torch.Tensor | None = None) -> np.ndarray:
    """RGB PIL image (or its `pixels_of`) + plan -> uint8 (3, size, size) (a view of HWC memory)."""
    out = _crop(img, pixels if pixels is not None else pixels_of(img), plan.box, crop)
    if plan.flip:
        out = cv2.flip(out, 1)
    for op, factor in plan.jitter:
        out = _JITTER[op](out, factor)
    if plan.gray:
        out = cv2.cvtColor(_grey(out), cv2.COLOR_GRAY2RGB)
    if plan.blur_sigma is not None:
        out = cv2.GaussianBlur(out, (0, 0), plan.blur_sigma, borderType=cv2.BORDER_REFLECT_101)
    if plan.solarize:
        out = cv2.LUT(out, _SOLARIZE)
    return out.transpose(2, 0, 1)


def row_rng(aug_seed) -> np.random.Generator:
    return np.random.default_rng(int(aug_seed) & 0xFFFF_FFFF_FFFF_FFFF)


def plan_views(spec: ViewSpec, aug_seed, width: int, height: int) -> list[ViewPlan]:
    """The plans of all views of one row (decoded size width x height), in view order."""
    rng = row_rng(aug_seed)
    return [plan_view(rng, c, width, height, spec.eval_resize) for c in spec.per_view()]


def make_views(data: bytes, aug_seed, spec: ViewSpec) -> list[np.ndarray]:
    """All views of one encoded image, in view order. Raises DecodeError."""
    pixels = torch.from_numpy(decode_pixels(data, min_side=spec.min_decode_side())).permute(2, 0, 1)
    plans = plan_views(spec, aug_seed, pixels.shape[2], pixels.shape[1])
    return [apply_view(None, plan, crop, pixels) for plan, crop in zip(plans, spec.per_view())]


class _one_thread:
    """Per-image tensor ops are too small to split across threads: the parallelism is
    one augment task per core."""

    def __enter__(self):
        self.threads = torch.get_num_threads(), cv2.getNumThreads()
        torch.set_num_threads(1)
        cv2.setNumThreads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.threads[0])
        cv2.setNumThreads(self.threads[1])


class ViewTransform:
    """Callable for Ray Data `map_batches(ViewTransform, fn_constructor_args=(spec,),
    batch_format="numpy")`, or to call directly on a dict of numpy columns.

    In: "image" (encoded bytes), "aug_seed" (int64), anything else passes through.
    Out: "view_0".."view_{n-1}" uint8 (N, 3, size, size) plus the passthrough columns, and
    with `spec.masks` set "masks" uint8 (N, planes, rows, cols) from `draw_masks`.
    Rows whose image does not decode are dropped with a warning.
    """

    def __init__(self, spec: ViewSpec):
        self.spec = spec
        self.crops = spec.per_view()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images, seeds = batch["image"], batch["aug_seed"]
        n = len(images)
        views = [np.empty((n, 3, c.size, c.size), np.uint8) for c in self.crops]
        keep = np.zeros(n, dtype=bool)
        with _one_thread():
            made = decodable_rows(n, batch.get("key"), lambda i: make_views(images[i], seeds[i], self.spec), log)
            for i, row in made:
                keep[i] = True
                for v, arr in zip(views, row):
                    v[i] = arr
        out = {f"view_{j}": (v if keep.all() else v[keep]) for j, v in enumerate(views)}
        if self.spec.masks is not None:
            m = self.spec.masks
            kept = np.asarray(seeds)[keep]
            out["masks"] = np.empty((len(kept), m.planes, *m.grid), np.uint8)
            for i, seed in enumerate(kept):
                out["masks"][i] = draw_masks(m, seed)
        return {**out, **kept_columns(batch, keep, ("image", "aug_seed"))}


def block_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor over `array`'s memory, no copy, also where the array is read-only: Ray Data
    hands out batches as read-only slices of its blocks, torch has no read-only tensors and
    torch.from_numpy warns. Never write to it in place; normalize and .to(device) make new
    tensors. (Copying every batch to make it writable cost 0.04-0.06 ms of the training
    worker's CPU per DINO image.)"""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)
        return torch.from_numpy(array)


def normalize(views: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) tensor -> float32 ImageNet-normalised, on the tensor's device.
    (x - mean) / std as float(x) * (1 / std) - mean / std, in place after the conversion:
    torch's uint8 -> float32 copy is vectorised, while an op that promotes uint8 to float
    on the fly is not (DINO's 10 views of 32 images, one CPU thread: 5 ms against 24-39 ms
    as torch.mul(uint8, float) then add_, the same values).
    On the CPU it runs on one thread: these passes are bound by memory, and a second
    thread mostly spins waiting for the first while it takes a core from the augment tasks
    (2 x 224 px views of 32 images: 1.7 ms of CPU on one thread, 2.9 ms on two, about the
    same wall time)."""
    scale, shift = _normalize_constants(views.device)
    with _one_thread() if views.device.type == "cpu" else contextlib.nullcontext():
        return views.to(torch.float32).mul_(scale).add_(shift)


@functools.cache
def _normalize_constants(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """normalize's (1 / std, -mean / std) per channel, on `device`, made once per device:
    it runs for every view of every batch, and on a GPU each new constant is a copy from
    the host. Only ever read."""
    std = torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1) * 255
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1) * 255
    return 1 / std, -mean / std
