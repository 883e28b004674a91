"""Image bytes -> header facts (probe) or an RGB PIL image (decode).

One place knows how to open untrusted image bytes: the shard builder probes with it
and the view pipeline decodes with it, so both agree on what "corrupt" means.
Decoding stays in uint8; JPEGs are decoded at a reduced DCT scale ("draft") when the
caller needs far fewer pixels than the file holds. `decode_pixels` decodes plain RGB
JPEGs with simplejpeg (libjpeg-turbo, about 1.8x PIL's decode into an array) and
everything else with PIL.
"""

from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from typing import cast

import numpy as np
import simplejpeg
from PIL import Image, ImageOps, UnidentifiedImageError

from raysl.data.view_plans import encode_plans, plan_views

log = logging.getLogger(__name__)

# PIL format name -> the name stored in shards. MPO is the multi-picture JPEG many
# cameras write; its first picture is an ordinary JPEG.
FORMATS = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "PNG": "png",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "GIF": "gif",
}
EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees


class DecodeError(Exception):
    """Bytes that do not give an image; `reason` is one of schema.SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int  # as displayed, i.e. after EXIF orientation
    height: int


def _open(data: bytes) -> Image.Image:
    if not data:
        raise DecodeError("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError("too_large", str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise DecodeError("not_image", str(exc)) from exc
    except Exception as exc:  # PIL raises many types for damaged headers
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 where there is none or it is unreadable."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not cost us the image
        return 1


def _draft_size(img: Image.Image, min_side: int) -> tuple[int, int] | None:
    """The size a reduced JPEG decode asks for that keeps the shorter side >= min_side;
    None where only a full-size decode does."""
    if img.format not in ("JPEG", "MPO"):
        return None
    w, h = img.size
    short = min(w, h)
    if short < 2 * min_side:
        return None
    return max(1, w * min_side // short), max(1, h * min_side // short)


def _draft_scale(img: Image.Image, size: tuple[int, int]) -> int:
    """The 1/1, 1/2, 1/4 or 1/8 scale PIL's draft picks for `size` (libjpeg also has M/8)."""
    scale = min(img.size[0] // size[0], img.size[1] // size[1])
    return next(s for s in (8, 4, 2, 1) if scale >= s)


def _draft(img: Image.Image, min_side: int) -> None:
    """Ask libjpeg for a 1/2, 1/4 or 1/8 scale decode that keeps the shorter side >= min_side."""
    size = _draft_size(img, min_side)
    if size is not None:
        img.draft(None, size)


def probe(data: bytes, *, max_pixels: int | None = None) -> ImageInfo:
    """Header facts of an image, after proving its pixels decode. Raises DecodeError."""
    img = _open(data)
    fmt = FORMATS.get(img.format or "")
    if fmt is None:
        raise DecodeError("unsupported_format", str(img.format))
    w, h = img.size
    if max_pixels is not None and w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} pixels > max_pixels {max_pixels}")
    if orientation(img) in _SWAPS_SIDES:
        w, h = h, w
    try:
        # Decoding every pixel is the only reliable test for truncation; at 1/8 DCT
        # scale it is cheap for JPEGs.
        _draft(img, 8)
        img.load()
    except Exception as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    return ImageInfo(fmt, w, h)


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        # 16-bit and 32-bit grey: PIL's convert() would clip to 255, so rescale (rounding:
        # 16-bit v * 257 comes back as exactly v). Float images in [0, 1] are scaled by 255.
        a = np.asarray(img, dtype=np.float64)
        top = a.max(initial=0)
        if mode.startswith("I;16") or top > 255:
            hi = 65535.0
        elif mode == "F" and top <= 1.0:
            hi = 1.0
        else:
            hi = 255.0
        a = np.clip(np.rint(a * (255.0 / hi)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in img.info):
        # Composite transparent pixels onto white instead of keeping whatever colour
        # the encoder left under alpha = 0.
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_rgb(data: bytes, *, min_side: int | None = None) -> Image.Image:
    """Decode to an upright RGB image. With `min_side`, JPEGs may come back smaller than
    stored, but never with a shorter side below `min_side`. Raises DecodeError."""
    return _upright_rgb(_open(data), min_side)


def _upright_rgb(img: Image.Image, min_side: int | None) -> Image.Image:
    """decode_rgb of an image `_open` gave."""
    try:
        if min_side:
            _draft(img, min_side)
        img.load()
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)
    except DecodeError:
        raise
    except Exception as exc:
        raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc


def decode_pixels(data: bytes, *, min_side: int | None = None) -> np.ndarray:
    """decode_rgb as an (H, W, 3) uint8 array. Plain RGB JPEGs (no EXIF rotation) decode
    with simplejpeg straight into the array, at the same DCT scale; the rest with PIL."""
    img = _open(data)
    if img.format in ("JPEG", "MPO") and img.mode == "RGB" and orientation(img) == 1:
        size = _draft_size(img, min_side) if min_side else None
        try:
            if size is None:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            scale = _draft_scale(img, size)  # the same scale as PIL's draft, so the same pixels
            w, h = (-(-side // scale) for side in img.size)
            return simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=w, min_height=h)
        except ValueError as exc:  # libjpeg errors and, strict, its warnings (truncated data)
            raise DecodeError("corrupt", f"{type(exc).__name__}: {exc}") from exc
    # the image opened above, not opened again (opening it again costs about a third of a small PNG's decode)
    return np.array(_upright_rgb(img, min_side), dtype=np.uint8)


def decodable_rows(n: int, keys, make, logger: logging.Logger = log):
    """(i, make(i)) for each row i < n whose image decodes, in order; a row whose image
    does not (make raises DecodeError) is dropped with a warning on `logger` naming its key."""
    for i in range(n):
        try:
            out = make(i)
        except DecodeError as exc:
            logger.warning("dropping row %s: image does not decode (%s)", keys[i] if keys is not None else i, exc)
            continue
        yield i, out


def kept_columns(batch: dict[str, np.ndarray], keep: np.ndarray, consumed: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The batch's other columns (all but `consumed`) at the rows `keep` marks."""
    return {name: np.asarray(col)[keep] for name, col in batch.items() if name not in consumed}


class PixelTransform:
    """Callable for Ray Data `map_batches` when the training worker makes the views
    (`data.augment_on=worker`, raysl.data.gpu_views): "image" (encoded bytes) -> "pixels",
    each row decoded as views.make_views decodes it (decode_pixels at the spec's
    min_decode_side()), and "plans": the row's view plans drawn from its aug_seed for that
    decoded size (view_plans.encode_plans), so the training worker only applies them.
    Anything else passes through. Rows whose image does not decode are dropped with a
    warning, as views.ViewTransform drops them. "pixels" is one (N, H, W, 3) uint8 array
    when all rows have one size, else an object array of the rows' arrays. Imports neither
    torch nor OpenCV: a fresh data worker starts on it in a fraction of a second."""

    def __init__(self, spec):
        self.spec = spec  # a view_plans.ViewSpec
        self.min_side = spec.min_decode_side()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch["image"]
        rows = list(
            decodable_rows(
                len(images), batch.get("key"), lambda i: decode_pixels(cast(bytes, images[i]), min_side=self.min_side)
            )
        )
        keep = np.zeros(len(images), dtype=bool)
        keep[[i for i, _ in rows]] = True
        pixels = [p for _, p in rows]
        if pixels and all(p.shape == pixels[0].shape for p in pixels):
            column = np.stack(pixels)
        else:
            column = np.empty(len(pixels), dtype=object)
            for i, p in enumerate(pixels):
                column[i] = p  # one by one: a slice assignment would stack same-shaped rows
        kept = kept_columns(batch, keep, ("image",))
        plans = [plan_views(self.spec, s, p.shape[1], p.shape[0]) for s, p in zip(kept["aug_seed"], pixels)]
        return {"pixels": column, "plans": encode_plans(plans, self.spec.n_views), **kept}
