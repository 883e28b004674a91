"""Write a small shard set straight with pyarrow (no Ray), for reader/view tests."""

from __future__ import annotations

import hashlib
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from raysl.data.schema import SCHEMA, Manifest, write_manifest


def _size(data: bytes) -> tuple[int, int]:
    try:
        return Image.open(io.BytesIO(data)).size
    except Exception:  # tests put deliberately broken images in shards
        return (0, 0)


def write_shards(directory: str, images: list[tuple[str, bytes, int | None]], shard_size: int) -> Manifest:
    os.makedirs(directory, exist_ok=True)
    manifest = Manifest(sources=["test"])
    for n, start in enumerate(range(0, len(images), shard_size)):
        rows = images[start : start + shard_size]
        sizes = [_size(b) for _, b, _ in rows]
        table = pa.table(
            {
                "key": [k for k, _, _ in rows],
                "image": [b for _, b, _ in rows],
                "sha256": [hashlib.sha256(b).hexdigest() for _, b, _ in rows],
                "width": [w for w, _ in sizes],
                "height": [h for _, h in sizes],
                "format": ["png"] * len(rows),
                "source": ["test"] * len(rows),
                "license": ["cc0-1.0"] * len(rows),
                "attribution": [""] * len(rows),
                "label": [lab for _, _, lab in rows],
            },
            schema=SCHEMA,
        )
        name = f"shard-{n:05d}.parquet"
        pq.write_table(table, os.path.join(directory, name))
        manifest.shards.append({"file": name, "rows": len(rows)})
    manifest.written = len(images)
    write_manifest(directory, manifest)
    return manifest


def digit_images(n: int = 40) -> list[tuple[str, bytes, int]]:
    """Real labeled 8x8 digits (scikit-learn), upscaled to 32 px and PNG-encoded."""
    from raysl.data.demo_images import digit_pngs

    return [(f"digits/{i:04d}.png", png, label) for i, (png, label) in enumerate(digit_pngs(32, n))]
