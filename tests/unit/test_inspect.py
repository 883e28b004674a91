"""Shard inspection: stats from the small columns only, and a contact sheet PNG."""

import hashlib
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagefactory import encode, photo
from PIL import Image

from raysl.data import inspect as shard_inspect
from raysl.data.schema import SCHEMA, Manifest, write_manifest
from raysl.data.shard_index import ShardIndex
from raysl.errors import UserError


def _row(key, data, w, h, fmt, license, label=None):
    return dict(
        key=key,
        image=data,
        sha256=hashlib.sha256(data).hexdigest(),
        width=w,
        height=h,
        format=fmt,
        source=f"/data/{key}",
        license=license,
        attribution="",
        label=label,
    )


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    shards = [
        [
            _row("cams/a.jpg", encode(photo(60), "JPEG"), 80, 60, "jpeg", "CC0-1.0", 1),
            _row("cams/b.png", encode(photo(90), "PNG"), 120, 90, "png", ""),
            _row("cams/c.webp", encode(photo(120), "WEBP"), 160, 120, "webp", "CC0-1.0", 2),
        ],
        [
            _row("web.tar/0", encode(photo(96), "JPEG"), 128, 96, "jpeg", "CC-BY-4.0"),
            _row("web.tar/1", b"\xff\xd8 damaged after the build", 40, 30, "jpeg", ""),
        ],
    ]
    names = [f"shard-{n:05d}.parquet" for n in range(len(shards))]
    for name, rows in zip(names, shards):
        pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), os.path.join(d, name))
    m = Manifest(
        shards=ShardIndex.from_columns(names, [len(rows) for rows in shards]),
        sources=["/data/cams", "/data/web.tar"],
        skipped={"corrupt": 2, "duplicate": 0},
    )
    m.written = 5
    write_manifest(d, m)
    return d


def test_stats_read_only_small_columns(shards, monkeypatch):
    seen = []
    real = pq.ParquetFile.read

    def spy(self, columns=None, **kw):
        seen.append(columns)
        return real(self, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read", spy)
    s = shard_inspect.inspect_shards(shards)
    assert seen and all(cols is not None and "image" not in cols for cols in seen)
    assert (s["images"], s["shards"], s["labeled"]) == (5, 2, 2)
    assert s["width"] == {"min": 40, "median": 120.0, "max": 160}
    assert s["height"] == {"min": 30, "median": 90.0, "max": 120}
    assert s["formats"] == {"jpeg": 3, "png": 1, "webp": 1}
    assert s["licenses"] == {"CC0-1.0": 2, "": 2, "CC-BY-4.0": 1}
    assert s["sources"] == {"cams": 3, "web.tar": 2}
    files = [os.path.join(shards, f"shard-0000{i}.parquet") for i in range(2)]
    assert s["bytes"] == sum(os.path.getsize(f) for f in files)
    assert 0 < s["image_bytes"] < s["bytes"]
    text = shard_inspect.format_inspect(s)
    for part in ("5 images in 2 shard(s)", "(none) 2", "CC0-1.0 2", "sources (2)", "median 120", "corrupt 2"):
        assert part in text


def test_stats_from_a_uri(shards):
    assert shard_inspect.inspect_shards("file://" + shards)["images"] == 5


def test_contact_sheet(shards, tmp_path):
    out = str(tmp_path / "sheets" / "sheet.png")
    drawn = shard_inspect.contact_sheet(shards, out, samples=64, thumb=32)
    assert drawn == 4  # 5 sampled, one does not decode
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (3 * 32, 2 * 32)  # 5 cells in a 3-column grid
        assert img.getpixel((16, 16)) != (32, 32, 32)  # the first cell holds an image
    drawn = shard_inspect.contact_sheet(shards, str(tmp_path / "two.png"), samples=2, thumb=20, seed=1)
    with Image.open(tmp_path / "two.png") as img:
        assert img.size == (2 * 20, 20) and drawn in (1, 2)


def test_not_a_shard_set(tmp_path):
    with pytest.raises(UserError, match="no manifest.json"):
        shard_inspect.inspect_shards(str(tmp_path))
