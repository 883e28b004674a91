"""`raysl shards inspect`: what a shard set holds, and a contact sheet to look at it.

Stats read only the small columns (parquet column projection); image bytes are
counted from the parquet footers, never read. Only the contact sheet decodes images,
and only the sampled ones.
"""

from __future__ import annotations

import argparse
import math
import posixpath
from collections import Counter

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from raysl.data.decode import DecodeError, decode_rgb
from raysl.data.schema import filesystem_and_path, read_manifest, shard_files
from raysl.data.shard_index import mask_rows, select_rows
from raysl.errors import UserError

STAT_COLUMNS = ["key", "width", "height", "format", "license", "label"]


def _spread(values: np.ndarray) -> dict:
    if not len(values):
        return {"min": 0, "median": 0, "max": 0}
    return {"min": int(values.min()), "median": float(np.median(values)), "max": int(values.max())}


def inspect_shards(directory: str) -> dict:
    manifest = read_manifest(directory)
    widths, heights = [], []
    formats: Counter[str] = Counter()
    licenses: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    labeled = total_bytes = image_bytes = 0
    for path, mask in shard_files(directory, manifest):
        fs, local = filesystem_and_path(path)
        total_bytes += fs.get_file_info(local).size
        with fs.open_input_file(local) as f:
            pf = pq.ParquetFile(f)
            meta = pf.metadata
            col = pf.schema_arrow.get_field_index("image")
            groups = range(meta.num_row_groups)
            image_bytes += sum(meta.row_group(g).column(col).total_uncompressed_size for g in groups)
            t = select_rows(pf.read(columns=STAT_COLUMNS), mask)  # a selection: only its rows
        widths.append(t["width"].to_numpy())
        heights.append(t["height"].to_numpy())
        formats.update(t["format"].to_pylist())
        licenses.update(t["license"].to_pylist())
        sources.update(k.split("/", 1)[0] for k in t["key"].to_pylist())  # key starts with the SRC name
        labeled += t.num_rows - t["label"].null_count
    w = np.concatenate(widths) if widths else np.zeros(0, np.int32)
    h = np.concatenate(heights) if heights else np.zeros(0, np.int32)
    return {
        "directory": directory,
        "images": int(len(w)),
        "shards": len(manifest.shards),
        "bytes": total_bytes,  # shard files on storage
        "image_bytes": image_bytes,  # encoded images inside them
        "width": _spread(w),
        "height": _spread(h),
        "formats": dict(formats.most_common()),
        "licenses": dict(licenses.most_common()),
        "sources": dict(sources.most_common()),
        "labeled": labeled,
        "skipped": dict(manifest.skipped),
        "curation": dict(manifest.curation),
    }


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def _breakdown(counts: dict) -> str:
    return ", ".join(f"{name or '(none)'} {n:,}" for name, n in counts.items()) or "-"


def _curation_lines(curation: dict) -> list[str]:
    if not curation:
        return []
    return [
        f"selection (raysl curate) of {curation.get('source')}: {_breakdown(curation.get('counts', {}))}; "
        "bytes above are of the source shard files it points into"
    ]


def format_inspect(stats: dict) -> str:
    w, h = stats["width"], stats["height"]
    skipped = {r: n for r, n in stats["skipped"].items() if n}
    return "\n".join(
        [
            f"{stats['directory']}: {stats['images']:,} images in {stats['shards']} shard(s), "
            f"{_size(stats['bytes'])} ({_size(stats['image_bytes'])} of images)",
            f"width  min {w['min']}  median {w['median']:g}  max {w['max']}",
            f"height min {h['min']}  median {h['median']:g}  max {h['max']}",
            f"formats: {_breakdown(stats['formats'])}",
            f"licenses: {_breakdown(stats['licenses'])}",
            f"sources ({len(stats['sources'])}): {_breakdown(stats['sources'])}",
            f"labeled: {stats['labeled']:,}",
            f"skipped when built: {_breakdown(skipped)}",
        ]
        + _curation_lines(stats.get("curation") or {})
    )


def contact_sheet(directory: str, out_png: str, *, samples: int = 64, thumb: int = 96, seed: int = 0) -> int:
    """Draw `samples` random images (seeded) as a grid of thumb x thumb cells; returns how
    many were drawn (images that fail to decode leave their cell empty)."""
    manifest = read_manifest(directory)
    counts = manifest.shards.rows
    total = int(counts.sum())
    if total == 0:
        raise UserError(f"{directory}: the shard set has no images to draw")
    n = min(samples, total)
    picks = np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))
    starts = np.concatenate([[0], np.cumsum(counts)])
    cols = math.ceil(math.sqrt(n))
    sheet = Image.new("RGB", (cols * thumb, math.ceil(n / cols) * thumb), (32, 32, 32))
    drawn = cell = 0
    for s, (path, mask) in enumerate(shard_files(directory, manifest)):
        rows = picks[(picks >= starts[s]) & (picks < starts[s + 1])] - starts[s]
        if mask is not None:
            rows = mask_rows(mask)[rows]  # the n-th selected row -> its row number in the file
        if not len(rows):
            continue
        fs, local = filesystem_and_path(path)
        with fs.open_input_file(local) as f:
            images = pq.read_table(f, columns=["image"])["image"].take(rows).to_pylist()
        for data in images:
            try:
                img = ImageOps.contain(decode_rgb(data, min_side=thumb), (thumb, thumb))
            except DecodeError:
                img = None
            if img is not None:
                x, y = (cell % cols) * thumb, (cell // cols) * thumb
                sheet.paste(img, (x + (thumb - img.width) // 2, y + (thumb - img.height) // 2))
                drawn += 1
            cell += 1
    fs, local = filesystem_and_path(out_png)
    parent = posixpath.dirname(local)
    try:
        if parent:
            fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(local) as f:
            sheet.save(f, format="PNG")
    except OSError as exc:
        raise UserError(f"{out_png}: cannot write the contact sheet here ({exc})") from exc
    return drawn


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("dir", type=resolve_path, help="the shard set: a folder or a bucket URI")
    p.add_argument("--grid", type=resolve_path, help="write a contact sheet PNG of sample images here")
    p.add_argument("--samples", type=int, default=64, help="images on the contact sheet (default 64)")


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.data.buckets import check_bucket

    check_bucket(args.dir, "raysl shards inspect")
    print(format_inspect(inspect_shards(args.dir)))
    if args.grid:
        n = contact_sheet(args.dir, args.grid, samples=args.samples)
        print(f"contact sheet: {n} images -> {args.grid}")
