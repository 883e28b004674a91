"""`raysl demo`'s data on the local Ray: the bundled photographs and the labeled digits
build into shards. The demo's training part is not run here."""

import csv
import os

import numpy as np
import pyarrow.parquet as pq

from raysl.data import build, demo_images
from raysl.data.decode import decode_rgb
from raysl.data.schema import SKIP_REASONS, read_manifest, shard_paths


def _rows(out):
    return [r for p in shard_paths(out, read_manifest(out)) for r in pq.read_table(p).to_pylist()]


def _shard_keys(out):
    return [pq.read_table(p, columns=["key"]).column("key").to_pylist() for p in shard_paths(out, read_manifest(out))]


def test_pool_and_digits_build_into_shards(tmp_path, ray_local):
    """One Ray build (they are slow on 2 cores): the photographs with no skips, and the
    digits' validation split as labeled rows."""
    pool = str(tmp_path / "pool")
    images = demo_images.copy_pool(pool)
    n = len(os.listdir(images))
    digits, digits_csv = demo_images.write_digits(str(tmp_path), limit=40)["val"]
    meta = tmp_path / "all.csv"  # one --metadata file for both SRCs
    with open(os.path.join(pool, "metadata.csv")) as a, open(digits_csv) as b, open(meta, "w", newline="") as f:
        w = csv.DictWriter(f, ["path", "license", "attribution", "source", "label"])
        w.writeheader()
        w.writerows(list(csv.DictReader(a)) + list(csv.DictReader(b)))
    out = str(tmp_path / "shards")
    m = build.build_shards([images, digits], out, shard_size=4, metadata=str(meta))
    again = str(tmp_path / "again")  # a rebuild of the same inputs: the same shards, row for row
    build.build_shards([images, digits], again, shard_size=4, metadata=str(meta))
    assert _shard_keys(again) == _shard_keys(out)
    assert m.written == n + 8 and m.skipped == {reason: 0 for reason in SKIP_REASONS}
    assert m.metadata_unmatched == 0
    rows = {r["key"]: r for r in _rows(out)}
    assert len({r["sha256"] for r in rows.values()}) == n + 8

    photos = [r for k, r in rows.items() if k.startswith("images/")]
    assert len(photos) == n and all(r["label"] is None for r in photos)
    assert sum(m.licenses.values()) == n + 8
    chelsea = rows["images/skimage_chelsea.png"]
    assert (chelsea["width"], chelsea["height"], chelsea["format"]) == (451, 300, "png")
    assert chelsea["source"] == "skimage:chelsea.png" and chelsea["license"] == "cc0-1.0"
    for r in photos:  # every stored image decodes to the size its row says
        assert decode_rgb(r["image"]).size == (r["width"], r["height"])

    from sklearn.datasets import load_digits

    target = load_digits().target
    labeled = sorted((r for k, r in rows.items() if k.startswith("digits_val/")), key=lambda r: r["key"])
    assert [r["label"] for r in labeled] == [int(target[i]) for i in range(4, 40, 5)]  # every 5th digit
    assert {r["license"] for r in labeled} == {"cc-by-4.0"}
    img = np.asarray(decode_rgb(labeled[0]["image"]))
    assert img.shape == (32, 32, 3) and img.std() > 20  # a real stroke, not a blank
