"""Augmentation views for SSL methods: encoded bytes in, uint8 CHW crops out.

Everything stays in uint8: each image is decoded once, each crop is cut and resized
straight from the decoded pixels by torch's uint8 antialiased resize (SIMD, about
3x PIL's; the same filter as PIL's), and the colour ops run on the small crop with
OpenCV's uint8 SIMD kernels (torchvision's PIL ops, one pass each): on CPU this is much
faster than float tensor ops (docs/views.md). Normalisation to float
happens on the training worker (`normalize`).

All randomness of a row comes from one numpy Generator seeded by the row's `aug_seed`,
so a row gives the same views whichever worker or process augments it. Drawing the
random parameters (`view_plans.plan_views`, torch-free, with the presets) is kept apart
from applying them (`apply_view`), so tests can see which ops a view would get without
looking at pixels, and a task that only decodes can draw them (`decode.PixelTransform`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import warnings
from typing import cast

import cv2
import numpy as np
import torch
from PIL import Image
from torch.nn.functional import interpolate

from raysl.data.decode import decodable_rows, decode_pixels, kept_columns
from raysl.data.masks import draw_masks
from raysl.data.view_plans import Crop, ViewPlan, ViewSpec, plan_views

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


# --- applying the plans (no randomness) -----------------------------------------------


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
        # (the same pixels, several times faster for a 224 px view).
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
    if pixels is None:
        assert img is not None, "apply_view needs the image or its pixels"
        pixels = pixels_of(img)
    out = _crop(img, pixels, plan.box, crop)
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
            made = decodable_rows(
                n, batch.get("key"), lambda i: make_views(cast(bytes, images[i]), seeds[i], self.spec), log
            )
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
    on the fly is not (same values as torch.mul(uint8, float) then add_, several times faster).
    On the CPU it runs on one thread: these passes are bound by memory, and a second
    thread mostly spins waiting for the first while it takes a core from the augment tasks
    (about the same wall time, more CPU)."""
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
