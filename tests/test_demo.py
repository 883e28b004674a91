"""`raysl demo`'s data: the real photographs and the labeled digits that ship inside
scikit-image / scikit-learn become shards. The demo's training part is not run here."""

import csv
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raysl.data import build, demo_images
from raysl.data.decode import decode_rgb
from raysl.data.schema import SKIP_REASONS, read_manifest, shard_paths

pytestmark = pytest.mark.ray


def _rows(out):
    return [r for p in shard_paths(out, read_manifest(out)) for r in pq.read_table(p).to_pylist()]


def _shard_keys(out):
    return [pq.read_table(p, columns=["key"]).column("key").to_pylist() for p in shard_paths(out, read_manifest(out))]


def test_copy_pool_copies_the_bundled_photographs_byte_for_byte(tmp_path):
    images = demo_images.copy_pool(str(tmp_path / "pool"))
    names = sorted(os.listdir(images))
    dirs = demo_images._dirs()
    expected = [f"{pkg}_{n}" for pkg, table in (("skimage", demo_images.SKIMAGE), ("sklearn", demo_images.SKLEARN))
                for n in table if os.path.exists(os.path.join(dirs[pkg], n))]
    assert names == sorted(expected) and len(names) >= 15  # the packages ship (nearly) all of them
    for name in names:
        pkg, original = name.split("_", 1)
        with open(os.path.join(images, name), "rb") as a, open(os.path.join(dirs[pkg], original), "rb") as b:
            assert a.read() == b.read()
        with Image.open(os.path.join(images, name)) as img:
            assert min(img.size) >= 64  # real photographs, not icons
    with open(tmp_path / "pool" / "metadata.csv") as f:
        meta = list(csv.DictReader(f))
    assert sorted(os.path.basename(r["path"]) for r in meta) == names
    assert all(r["attribution"] and r["source"] for r in meta)


def test_digits_are_split_and_labeled(tmp_path):
    splits = demo_images.write_digits(str(tmp_path), limit=40)
    (train, train_csv), (val, val_csv) = splits["train"], splits["val"]
    assert (len(os.listdir(train)), len(os.listdir(val))) == (32, 8)
    from sklearn.datasets import load_digits

    target = load_digits().target
    for folder, labels, idx in ((train, train_csv, [i for i in range(40) if i % 5 != 4]), (val, val_csv, range(4, 40, 5))):
        with open(labels) as f:
            rows = list(csv.DictReader(f))
        assert [os.path.basename(r["path"]) for r in rows] == [f"{i:04d}.png" for i in idx]
        assert [int(r["label"]) for r in rows] == [int(target[i]) for i in idx]
        assert all(os.path.dirname(r["path"]) == folder for r in rows)


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
