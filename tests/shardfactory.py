"""Write a small shard set straight with pyarrow (no Ray), for reader/view tests."""

from __future__ import annotations

import io
import os
from types import SimpleNamespace

import pyarrow.parquet as pq
from PIL import Image

from raysl.data import legacy
from raysl.data.schema import Manifest, read_manifest, shard_paths, write_shard_set
from raysl.data.shard_index import INDEX


def _size(data: bytes) -> tuple[int, int]:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # tests put deliberately broken images in shards
        return (0, 0)


def write_shards(directory: str, images: list[tuple[str, bytes, int | None]], shard_size: int) -> Manifest:
    rows = []
    for key, data, label in images:
        width, height = _size(data)
        rows.append(
            {
                "key": key,
                "image": data,
                "width": width,
                "height": height,
                "format": "png",
                "source": "test",
                "license": "cc0-1.0",
                "attribution": "",
                "label": label,
            }
        )
    return write_shard_set(directory, rows, shard_size=shard_size, sources=["test"])


def digit_images(n: int = 40) -> list[tuple[str, bytes, int]]:
    """Real labeled 8x8 digits (scikit-learn), upscaled to 32 px and PNG-encoded."""
    from raysl.data.demo_images import digit_pngs

    return [(f"digits/{i:04d}.png", png, label) for i, (png, label) in enumerate(digit_pngs(32, n))]


def as_v1(d: str) -> Manifest:
    """Turn a current set into the version 1 layout: the shard list inside manifest.json."""
    m = read_manifest(d)
    old = legacy.ManifestV1(
        shards=[{"file": s["file"], "rows": s["rows"]} for s in m.shards],
        written=m.written,
        skipped=m.skipped,
        licenses=m.licenses,
        sources=m.sources,
    )
    os.remove(os.path.join(d, INDEX))
    legacy.write_v1(d, old)
    return m


def set_content(out: str, index=None) -> dict:
    """Every row of the set (or of one index version), as key -> (sha256, image bytes)."""
    m = read_manifest(out, index)
    rows = [r for p in shard_paths(out, m) for r in pq.read_table(p).to_pylist()]
    return {r["key"]: (r["sha256"], r["image"]) for r in rows}


def mixture_data(shards, weights=()):
    """The `data` section of a config as the mixture code reads it: data.shards and data.weights."""
    return SimpleNamespace(shards=shards, weights=list(weights))
