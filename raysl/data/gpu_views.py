"""The views of `raysl.data.views` made on a GPU: batched JPEG decode, crops and colour on the device.

An optional path for when a GPU is at hand: a batch of encoded JPEGs is
decoded with `torchvision.io.decode_jpeg(..., device=device)` (nvJPEG on CUDA, libjpeg on
the CPU), each row's random decisions are drawn by the CPU path's own `plan_views` from
the row's `aug_seed` at the decoded size, and the plans are applied on the device:

- the image turned upright from its EXIF orientation (nvJPEG ignores decode_jpeg's
  apply_exif_orientation, so it is read from the header and applied here on every device);
- crop + resize per image and view (antialiased interpolation with the crop's filter, as
  torchvision's resize of a float tensor), then the flip;
- colour jitter batched over all views of one size, with per-row factors and per-row op
  order (for each of the four positions, each op is applied to the rows that have it there);
  grayscale, Gaussian blur with per-row sigma (a grouped separable convolution; kernel
  `blur_kernel_size`), solarize (threshold 128 of 255); then ImageNet normalisation.

The arithmetic stays in float32 on [0, 1] between the crop and the normalisation, where
the CPU path truncates to uint8 after every op (as PIL does): the two agree within a grey level
per op and three for a whole DINO view on average (tests/unit/test_gpu_views.py measures
each op), not bit for bit.

Only JPEGs decode here: other formats and damaged files are dropped, counted
(`GPUViews.dropped`) and logged, never raised. Patch masks (`spec.masks`) and the eval
view (`spec.eval_resize`) are not made here; they stay on the CPU path.

torchvision deprecates its `torchvision.io` decoders from 0.29 in favour of TorchCodec;
they still work, with a DeprecationWarning.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from raysl.data.decode import orientation
from raysl.data.view_plans import JITTER_NAMES, Crop, ViewPlan, ViewSpec, decode_plans, plan_views
from raysl.data.views import IMAGENET_MEAN, IMAGENET_STD, block_tensor
from raysl.errors import UserError

log = logging.getLogger(__name__)

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L") and torchvision's rgb_to_grayscale


class GPUViewBatch(NamedTuple):
    views: list[torch.Tensor]  # per view (spec.per_view() order): float32 (kept, 3, size, size), normalised
    kept: list[int]  # indices into the input of the rows that decoded, in input order


def blur_kernel_size(crop: Crop) -> int:
    """Odd kernel side: the torchvision recipe's ~10% of the crop (23 for 224, 9 for 96),
    widened to cover 3 sigma of the largest sigma, as PIL's blur (no cut-off) and the CPU
    path's OpenCV blur (3 sigma) do: 13 for sigma 2 on a 96 px crop."""
    return max(crop.size // 10 // 2 * 2 + 1, 2 * math.ceil(3 * crop.blur_sigma[1]) + 1)


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) in a JPEG's header, 1 where there is none or it is unreadable."""
    try:
        img = Image.open(io.BytesIO(data))
    except Exception:  # not an image: decode drops it
        return 1
    return orientation(img)  # the CPU decode's reading, damaged EXIF blocks included


def upright(img: torch.Tensor, orientation: int) -> torch.Tensor:
    """(3, H, W) as stored -> as displayed: PIL's ImageOps.exif_transpose on a tensor."""
    if orientation == 2:
        return img.flip(-1)
    if orientation == 3:
        return img.flip(-2, -1)
    if orientation == 4:
        return img.flip(-2)
    if orientation == 5:
        return img.transpose(-2, -1)
    if orientation == 6:
        return torch.rot90(img, -1, (-2, -1))
    if orientation == 7:
        return img.flip(-2, -1).transpose(-2, -1)
    if orientation == 8:
        return torch.rot90(img, 1, (-2, -1))
    return img


def _decode(images: list[bytes], device: torch.device, first: int = 0) -> list[torch.Tensor | None]:
    """Batched decode, upright as the CPU path decodes (nvJPEG ignores decode_jpeg's
    apply_exif_orientation, so the EXIF orientation is read from the header and applied
    here on every device); when the batch call raises, one by one so only the bad rows are lost."""
    data = [
        torch.frombuffer(bytearray(b), dtype=torch.uint8) if len(b) else torch.empty(0, dtype=torch.uint8)
        for b in images
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision.io -> TorchCodec
        try:
            out: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except (RuntimeError, ValueError):
            out = []
            for i, d in enumerate(data):
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError) as exc:
                    log.warning("dropping row %d: not a JPEG that decodes (%s)", first + i, _reason(exc))
                    out.append(None)
    return [img if img is None else upright(img, exif_orientation(b)) for img, b in zip(out, images)]


def _reason(exc: Exception) -> str:
    """torchvision's decode error without its source path ("decode_jpeg, file.cpp:171, msg")."""
    text = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return text.split(", ", 2)[-1][:200]


def _resized_crop(pixels: torch.Tensor, box, crop: Crop) -> torch.Tensor:
    """uint8 (3, H, W) -> float (3, size, size) on 0..255, unclamped: the box cut out and
    resized with antialiasing and the crop's filter (torchvision's resize of a float
    tensor, called as torch.nn.functional.interpolate without its per-call dispatch)."""
    left, top, right, bottom = (int(v) for v in box)
    region = pixels[:, top:bottom, left:right].unsqueeze(0).to(torch.float32)
    size = (crop.size, crop.size)
    return torch.nn.functional.interpolate(region, size, mode=crop.interpolation, align_corners=False, antialias=True)[
        0
    ]


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) -> (N, 1, H, W) luma."""
    r, g, b = x.unbind(1)
    return (r * _LUMA[0] + g * _LUMA[1] + b * _LUMA[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1]; factor (N,) per row."""
    f = factor.view(-1, 1, 1, 1)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """RGB -> HSV, H + shift (per row, in turns) mod 1, -> RGB; torchvision's tensor adjust_hue
    with a factor per row."""
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    s = delta / maxc.clamp_min(1e-12)
    d = delta.clamp_min(1e-12)
    r, g, b = x.unbind(1)
    h = torch.where(maxc == r, (g - b) / d, torch.where(maxc == g, (b - r) / d + 2, (r - g) / d + 4))
    h = torch.where(delta > 0, h, torch.zeros_like(h))
    h6 = (h / 6 + shift.view(-1, 1, 1)).remainder(1.0) * 6
    # hsv -> rgb: channel n (5, 3, 1 for r, g, b) is v - v s clamp(min(k, 4 - k), 0, 1), k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = (h6 + n).remainder(6.0)
        out.append(maxc - maxc * s * torch.minimum(k, 4 - k).clamp(0, 1))
    return torch.stack(out, 1)


def _apply_jitter_op(x: torch.Tensor, op: str, factor: torch.Tensor) -> torch.Tensor:
    if op == "brightness":
        return (x * factor.view(-1, 1, 1, 1)).clamp_(0, 1)
    if op == "contrast":
        return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)
    if op == "saturation":
        return _blend(x, _gray(x), factor)
    if op == "hue":
        # torchvision's PIL adjust_hue (the recipes' op) adds trunc(factor * 255) to an 8-bit
        # hue whose full turn is 255: shift by the same whole steps (the CPU path's OpenCV hue
        # turns in 256 steps)
        return _shift_hue(x, torch.trunc(factor * 255) / 255)
    raise ValueError(f"unknown colour op {op!r}; expected one of {JITTER_NAMES}")


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per row: a grouped convolution. Edge pixels are
    repeated, as PIL's blur clamps at the edges; torchvision and the CPU path's OpenCV blur
    reflect."""
    n, c, h, w = x.shape
    half = kernel // 2
    pos = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    k1d = torch.exp(-0.5 * (pos.view(1, -1) / sigma.view(-1, 1)) ** 2)
    k1d = (k1d / k1d.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n * c, kernel)
    y = x.reshape(1, n * c, h, w)
    y = torch.nn.functional.pad(y, (half, half, half, half), mode="replicate")
    y = torch.nn.functional.conv2d(y, k1d.view(n * c, 1, 1, kernel), groups=n * c)
    y = torch.nn.functional.conv2d(y, k1d.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, h, w)


def _where_rows(x: torch.Tensor, rows: list[int], fn) -> None:
    """x[rows] = fn(x[rows]) in place, for the rows listed (none: nothing)."""
    if rows:
        idx = torch.tensor(rows, device=x.device)
        x.index_copy_(0, idx, fn(x.index_select(0, idx)))


class GPUViews:
    """Callable: (encoded JPEG bytes, aug_seeds) -> GPUViewBatch of normalised float32 views
    on `device`, the same random decisions per row as `raysl.data.views.make_views`.

    `chunk` rows are decoded and augmented at a time (memory: the decoded chunk plus the
    float views of the chunk); the outputs of the whole call are kept on the device."""

    def __init__(self, spec: ViewSpec, device: str | torch.device = "cuda", chunk: int = 256):
        if spec.masks is not None:
            raise UserError(
                f"views {spec.name!r} draw patch masks, which GPUViews does not make; "
                "use raysl.data.views.ViewTransform (the CPU path) for masking methods"
            )
        if spec.eval_resize:
            raise UserError(
                f"views {spec.name!r} is the eval view (resize + centre crop), which GPUViews does not make; "
                "use raysl.data.views.ViewTransform (the CPU path)"
            )
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise UserError(f"chunk={chunk!r}: must be an integer >= 1")
        self.spec = spec
        self.device = torch.device(device)
        self.chunk = chunk
        self.crops = spec.per_view()
        self.dropped = 0  # rows dropped because they did not decode, over all calls
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: list[bytes], aug_seeds) -> GPUViewBatch:
        seeds = [int(s) for s in aug_seeds]
        if len(seeds) != len(images):
            raise UserError(f"{len(images)} images but {len(seeds)} aug_seeds: give one seed per image")
        parts: list[list[torch.Tensor]] = []
        kept: list[int] = []
        for start in range(0, len(images), self.chunk):
            decoded = _decode(images[start : start + self.chunk], self.device, start)
            rows = [i for i, img in enumerate(decoded) if img is not None]
            self.dropped += len(decoded) - len(rows)
            if not rows:
                continue
            pixels = [img for img in decoded if img is not None]
            plans = [plan_views(self.spec, seeds[start + i], p.shape[2], p.shape[1]) for i, p in zip(rows, pixels)]
            parts.append(self.apply(pixels, plans))
            kept += [start + i for i in rows]
        if not parts:
            empty = [torch.empty((0, 3, c.size, c.size), device=self.device) for c in self.crops]
            return GPUViewBatch(empty, [])
        views = parts[0] if len(parts) == 1 else [torch.cat(p) for p in zip(*parts)]
        return GPUViewBatch(views, kept)

    def from_pixels(self, pixels, plans) -> list[torch.Tensor]:
        """A data task's decoded rows and their plans (decode.PixelTransform's "pixels":
        uint8 (N, H, W, 3) or a sequence of (H, W, 3); "plans": view_plans.encode_plans',
        drawn there from each row's aug_seed as the CPU path draws them) -> the views."""
        if isinstance(pixels, np.ndarray) and pixels.dtype != object:
            rows = list(block_tensor(pixels).to(self.device).permute(0, 3, 1, 2))
        else:
            rows = [block_tensor(p).to(self.device).permute(2, 0, 1) for p in pixels]
        return self.apply(rows, decode_plans(plans))

    def apply(self, pixels: list[torch.Tensor], plans: list[list[ViewPlan]]) -> list[torch.Tensor]:
        """Decoded uint8 (3, H, W) images on the device + each row's plans (view order) ->
        per view float32 (rows, 3, size, size) normalised. No randomness here."""
        if len(pixels) != len(plans) or any(len(p) != len(self.crops) for p in plans):
            raise ValueError(f"need one plan per view ({len(self.crops)}) for each of the {len(pixels)} images")
        n = len(pixels)
        out: dict[int, torch.Tensor] = {}
        for size in sorted({c.size for c in self.crops}, reverse=True):
            idx = [j for j, c in enumerate(self.crops) if c.size == size]
            # all views of this size, view-major: row r of view idx[v] sits at v * n + r
            flat_plans = [plans[r][j] for j in idx for r in range(n)]
            flat_crops = [self.crops[j] for j in idx for _ in range(n)]
            x = torch.stack([_resized_crop(pixels[r], plans[r][j].box, self.crops[j]) for j in idx for r in range(n)])
            x = x.clamp_(0, 255).div_(255)  # bicubic overshoots; the CPU path's uint8 resize clamps
            _where_rows(x, [r for r, p in enumerate(flat_plans) if p.flip], lambda y: y.flip(-1))
            self._colour(x, flat_plans, flat_crops)
            x = x.sub_(self._mean).div_(self._std)
            for v, j in enumerate(idx):
                out[j] = x[v * n : (v + 1) * n]
        return [out[j] for j in range(len(self.crops))]

    def _colour(self, x: torch.Tensor, plans: list[ViewPlan], crops: list[Crop]) -> None:
        """The plans' jitter, grayscale, blur and solarize on x (rows, 3, s, s) in [0, 1], in place."""
        for pos in range(len(JITTER_NAMES)):
            for op in JITTER_NAMES:
                rows = [r for r, p in enumerate(plans) if len(p.jitter) > pos and p.jitter[pos][0] == op]
                if rows:
                    f = torch.tensor([plans[r].jitter[pos][1] for r in rows], device=x.device)
                    _where_rows(x, rows, lambda y, op=op, f=f: _apply_jitter_op(y, op, f))
        _where_rows(x, [r for r, p in enumerate(plans) if p.gray], lambda y: _gray(y).expand(-1, 3, -1, -1))
        for kernel in sorted({blur_kernel_size(c) for c in crops}):
            rows = [
                r
                for r, (p, c) in enumerate(zip(plans, crops))
                if p.blur_sigma is not None and blur_kernel_size(c) == kernel
            ]
            sigma = torch.tensor([plans[r].blur_sigma or 0.0 for r in rows], device=x.device).clamp_min(1e-3)
            _where_rows(x, rows, lambda y, s=sigma, k=kernel: _gaussian_blur(y, s, k))
        # PIL inverts uint8 values >= 128: the float values that round to 128 or more
        _where_rows(
            x, [r for r, p in enumerate(plans) if p.solarize], lambda y: torch.where(y >= 127.5 / 255, 1 - y, y)
        )
