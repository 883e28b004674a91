"""Real-shaped image files of every kind the builder must handle, made in memory, and written as folders.

The pixels come from a real photograph shipped inside scikit-image, so these are
real JPEG/PNG/... encodings, not placeholder bytes.
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
import skimage.data
from PIL import Image


def photo(size: int = 96) -> Image.Image:
    return Image.fromarray(skimage.data.chelsea()).resize((size * 4 // 3, size))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG signature + IHDR declaring enormous dimensions: a decompression bomb."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> bytes:
    """A landscape JPEG whose EXIF says 'rotate 90 CW' (orientation 6): shown as portrait."""
    img = photo()
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def sixteen_bit_png() -> bytes:
    grey = np.asarray(photo().convert("L"), dtype=np.uint16) * 257
    return encode(Image.fromarray(grey), "PNG")  # uint16 array -> I;16


def red_then_blue_gif() -> bytes:
    """A 16x16 two-frame GIF: the first frame solid red, the second solid blue."""
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:])


def good_files() -> dict[str, bytes]:
    """name -> bytes of images that must be kept."""
    img = photo()
    return {
        "good.jpg": encode(img, "JPEG", quality=90),
        "good.png": encode(img, "PNG"),
        "good.webp": encode(img, "WEBP", quality=80),
        "good.bmp": encode(img, "BMP"),
        "good.tiff": encode(img, "TIFF"),
        "anim.gif": encode(img.convert("P"), "GIF", save_all=True, append_images=[img.rotate(90).convert("P")]),
        "cmyk.jpg": encode(img.convert("CMYK"), "JPEG"),
        "deep16.png": sixteen_bit_png(),
        "palette_alpha.png": encode(img.convert("RGBA").convert("P"), "PNG", transparency=0),
        "rgba.png": encode(img.convert("RGBA"), "PNG"),
        "grey.jpg": encode(img.convert("L"), "JPEG"),
        "rotated.jpg": exif_rotated_jpeg(),
        "png_named.jpg": encode(img, "PNG"),  # wrong extension: the header decides
    }


def bad_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, skip reason) of inputs that must be skipped and counted."""
    jpeg = encode(photo(), "JPEG", quality=90)
    return {
        "empty.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "corrupt"),
        "notes.jpg": (b"these are meeting notes, not an image\n" * 20, "not_image"),
        "bomb.png": (huge_png_header(), "too_large"),
        # a real image in a format PIL reads but shards do not take (PPM), behind an image extension
        "portable.png": (encode(photo(), "PPM"), "unsupported_format"),
    }


def write_file(path, data: bytes) -> None:
    """Write `data` at `path`, creating the folders above it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def write_folder(path, images: dict) -> str:
    """A folder of image files: name (may hold subfolders) -> bytes."""
    for name, data in images.items():
        write_file(os.path.join(path, name), data)
    return str(path)


def read_file(path, mode="r"):
    """The whole file, as text or (mode "rb") bytes."""
    with open(path, mode) as f:
        return f.read()
