"""Test material for curation, from real images that ship inside installed wheels.

`planted_duplicates`: photographs (scikit-image, scikit-learn) plus near-duplicate copies of
each: re-encoded as JPEG at quality 10, resized to half, cropped to the central 90%, and
colour-shifted slightly. The stereo pair motorcycle_right (a near-duplicate of
motorcycle_left by nature) is left out, so the only duplicates are the planted ones.
`long_tailed_digits`: scikit-learn's digits with one class making up half of the set.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageEnhance

VARIANTS = ("jpeg_q10", "half", "crop90", "colour")


def _encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def variant(img: Image.Image, kind: str) -> bytes:
    w, h = img.size
    if kind == "jpeg_q10":
        return _encode(img, "JPEG", quality=10)
    if kind == "half":
        return _encode(img.resize((max(1, w // 2), max(1, h // 2)), Image.Resampling.BICUBIC))
    if kind == "crop90":
        dx, dy = round(w * 0.05), round(h * 0.05)
        return _encode(img.crop((dx, dy, w - dx, h - dy)))
    if kind == "colour":
        shifted = ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.15)).enhance(1.08)
        r, g, b = shifted.split()
        return _encode(Image.merge("RGB", (r.point(lambda v: min(255, v + 6)), g, b)))
    raise ValueError(kind)


def photographs(size: int = 256, limit: int | None = None) -> list[tuple[str, Image.Image]]:
    """(name, RGB image with shorter side `size`) of the bundled photographs, no people."""
    from raysl.data.demo_images import SKIMAGE, SKLEARN, data_dirs

    dirs = data_dirs()
    out = []
    for pkg, table in (("skimage", SKIMAGE), ("sklearn", SKLEARN)):
        for name in table:
            path = os.path.join(dirs[pkg], name)
            if name == "motorcycle_right.png" or not os.path.exists(path):
                continue
            img = Image.open(path).convert("RGB")
            scale = size / min(img.size)
            out.append((f"{pkg}_{name}", img.resize((round(img.width * scale), round(img.height * scale)))))
    return out[:limit]


def planted_duplicates(size: int = 256, limit: int | None = None) -> list[dict]:
    """Rows (key, image, group, original) for write_shard_set-like use: every photograph as
    PNG (original=True) and its VARIANTS (original=False); `group` names the photograph."""
    rows = []
    for name, img in photographs(size, limit):
        rows.append({"key": f"photos/{name}/original.png", "image": _encode(img), "group": name, "original": True})
        for kind in VARIANTS:
            rows.append({"key": f"photos/{name}/{kind}", "image": variant(img, kind), "group": name, "original": False})
    return rows


def long_tailed_digits(n: int = 600, head: int = 0, head_fraction: float = 0.5, seed: int = 0):
    """Indices into scikit-learn's digits: class `head` makes up `head_fraction` of `n`, the
    other classes share the rest equally. Returns (indices, labels of all digits)."""
    from sklearn.datasets import load_digits

    labels = load_digits().target
    rng = np.random.default_rng(seed)
    n_head = int(n * head_fraction)
    tail = (n - n_head) // 9
    picks = [rng.choice(np.flatnonzero(labels == head), n_head, replace=False)]
    picks += [rng.choice(np.flatnonzero(labels == c), tail, replace=False) for c in range(10) if c != head]
    return np.sort(np.concatenate(picks)), labels


def entropy_fraction(labels) -> float:
    """Entropy of the label distribution over the maximum, log(classes present in `labels`'s universe: 10)."""
    counts = np.bincount(np.asarray(labels), minlength=10).astype(float)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(len(counts)))
