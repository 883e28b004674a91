"""Shard builder: folders, tars and parquet in; shards, counts and a manifest out.

Ray builds are slow on 2 cores, so each module fixture builds one shard set once and
the tests assert many things about it.
"""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagefactory import bad_files, encode, good_files, photo, red_then_blue_gif, write_file

from raysl.data import build
from raysl.data.decode import decode_rgb
from raysl.data.schema import MANIFEST, SCHEMA, SKIP_REASONS, read_manifest, shard_paths
from raysl.data.shard_index import INDEX
from raysl.errors import UserError


def _rows(out):
    m = read_manifest(out)
    tables = [pq.read_table(p) for p in shard_paths(out, m)]
    assert all(t.schema == SCHEMA for t in tables)
    return {r["key"]: r for t in tables for r in t.to_pylist()}


# ---------------------------------------------------------------- a folder of images


@pytest.fixture(scope="module")
def folder(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("folder")
    src = tmp / "imgs"
    files = {}
    for name, data in good_files().items():
        files[name] = data
    for name, (data, _) in bad_files().items():
        files[f"sub/{name}"] = data
    files["aaa_copy.jpg"] = good_files()["good.jpg"]  # sorts before good.jpg: it is the one kept
    files["frames.gif"] = red_then_blue_gif()
    files["sub/broken.tar"] = b"not a tar archive at all" * 40  # a tar that cannot be read: "unreadable"
    for name, data in files.items():
        write_file(str(src / name), data)
    write_file(str(src / "README.txt"), b"not an input")
    write_file(str(src / "sub" / "labels.md"), b"not an input either")
    meta = tmp / "meta.csv"
    meta.write_text(
        "path,key,license,attribution,label,source,extra\n"
        "good.webp,,CC-BY-4.0,Ann,1,,ignored\n"  # by path, relative to the SRC
        f"{src / 'rotated.jpg'},,CC0-1.0,,2,,\n"  # by absolute path
        "missing.jpg,,CC0-1.0,,,,\n"  # matches nothing
        ",imgs/good.bmp,CC0-1.0,Bob,3,https://example.org/good.bmp,\n"  # by key, with a source
    )
    out = str(tmp / "out")
    manifest = build.build_shards([str(src)], out, shard_size=4, metadata=str(meta))
    return dict(src=str(src), out=out, files=files, manifest=manifest, rows=_rows(out))


def test_folder_round_trip_keeps_bytes_exactly(folder):
    rows = folder["rows"]
    want = {f"imgs/{n}" for n in good_files()} | {"imgs/aaa_copy.jpg", "imgs/frames.gif"}
    want -= {"imgs/good.jpg", "imgs/png_named.jpg"}  # duplicates of aaa_copy.jpg and good.png
    assert set(rows) == want
    for key, r in rows.items():
        data = folder["files"][key.split("/", 1)[1]]
        assert r["image"] == data
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        if key != "imgs/good.bmp":  # its source comes from the metadata
            assert r["source"] == os.path.join(folder["src"], key.split("/", 1)[1])
    assert rows["imgs/good.png"]["format"] == "png"
    assert rows["imgs/anim.gif"]["format"] == "gif"
    assert rows["imgs/good.tiff"]["format"] == "tiff"
    assert (rows["imgs/good.png"]["width"], rows["imgs/good.png"]["height"]) == (128, 96)
    assert (rows["imgs/rotated.jpg"]["width"], rows["imgs/rotated.jpg"]["height"]) == (96, 128)  # EXIF-rotated


def test_folder_counts_every_skip_reason(folder):
    m = folder["manifest"]
    assert list(m.skipped) == list(SKIP_REASONS)
    want = {reason: 0 for reason in SKIP_REASONS}
    for _, reason in bad_files().values():
        want[reason] += 1
    want["duplicate"] = 2
    want["unreadable"] = 1  # sub/broken.tar
    assert m.skipped == want
    assert m.ignored_files == 2
    assert m.written == m.rows == len(folder["rows"])
    assert m.sources == [folder["src"]]
    summary = build.format_summary(m)
    assert f"wrote {m.written} images" in summary and "duplicate 2" in summary and "ignored 2" in summary


def test_folder_manifest_and_shards_on_disk(folder):
    out, m = folder["out"], folder["manifest"]
    assert read_manifest(out) == m
    assert all(0 < s["rows"] <= 4 for s in m.shards)
    assert [s["file"] for s in m.shards] == [f"shard-{i:05d}.parquet" for i in range(len(m.shards))]
    assert sorted(os.listdir(out)) == sorted([MANIFEST, INDEX] + [s["file"] for s in m.shards])  # staging gone
    with pytest.raises(UserError, match="--overwrite"):
        build.build_shards([folder["src"]], out)


def test_folder_metadata_join(folder):
    rows, m = folder["rows"], folder["manifest"]
    assert (rows["imgs/good.webp"]["license"], rows["imgs/good.webp"]["attribution"]) == ("CC-BY-4.0", "Ann")
    assert rows["imgs/good.webp"]["label"] == 1
    assert (rows["imgs/rotated.jpg"]["license"], rows["imgs/rotated.jpg"]["label"]) == ("CC0-1.0", 2)
    assert rows["imgs/good.png"]["license"] == "" and rows["imgs/good.png"]["label"] is None
    r = rows["imgs/good.bmp"]  # a CSV row keyed by key
    assert (r["license"], r["attribution"], r["label"], r["source"]) == (
        "CC0-1.0",
        "Bob",
        3,
        "https://example.org/good.bmp",
    )
    assert m.licenses == {"": len(rows) - 3, "CC-BY-4.0": 1, "CC0-1.0": 2}
    assert m.metadata_unmatched == 1


def test_folder_gif_keeps_its_first_frame(folder):
    r = folder["rows"]["imgs/frames.gif"]
    assert (r["format"], r["width"], r["height"], r["image"]) == ("gif", 16, 16, red_then_blue_gif())
    assert np.asarray(decode_rgb(r["image"])).reshape(-1, 3).mean(0).tolist() == [255, 0, 0]


# ---------------------------------------------------------------- --max-pixels, JSONL by path


@pytest.fixture(scope="module")
def limits(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("limits")
    src = tmp / "lim"
    for name, size in (("big.png", 96), ("mid.jpg", 60), ("small.png", 48)):
        write_file(str(src / name), encode(photo(size), "JPEG" if name.endswith("jpg") else "PNG"))
    meta = tmp / "meta.jsonl"
    meta.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"path": "small.png", "source": "https://example.org/small", "license": "CC0-1.0"},  # relative path
                {"path": str(src / "mid.jpg"), "label": 4, "attribution": "Cy"},  # absolute path
                {"path": "big.png", "license": "CC0-1.0"},  # joined, then dropped as too large
            ]
        )
        + "\n"
    )
    out = str(tmp / "out")
    manifest = build.build_shards([str(src)], out, metadata=str(meta), max_pixels=80 * 60)  # mid.jpg is 80x60
    return dict(src=str(src), manifest=manifest, rows=_rows(out))


def test_custom_max_pixels_drops_bigger_images(limits):
    m = limits["manifest"]
    assert set(limits["rows"]) == {"lim/mid.jpg", "lim/small.png"}
    assert m.skipped == {**{reason: 0 for reason in SKIP_REASONS}, "too_large": 1}
    assert "too_large 1" in build.format_summary(m)


def test_jsonl_metadata_by_path_joins_source(limits):
    rows, m = limits["rows"], limits["manifest"]
    small, mid = rows["lim/small.png"], rows["lim/mid.jpg"]
    assert (small["source"], small["license"], small["label"]) == ("https://example.org/small", "CC0-1.0", None)
    assert (mid["source"], mid["attribution"], mid["label"]) == (os.path.join(limits["src"], "mid.jpg"), "Cy", 4)
    assert m.licenses == {"": 1, "CC0-1.0": 1} and m.metadata_unmatched == 0


# ---------------------------------------------------------------- WebDataset tar + parquet


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for name, data in samples:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("mixed")
    jpg = encode(photo(), "JPEG", quality=90)
    png = encode(photo(), "PNG")
    other = encode(photo(120).rotate(180), "JPEG")
    small = encode(photo(40), "JPEG")
    truncated = bad_files()["truncated.jpg"][0]
    tar = str(tmp / "data.tar")
    _tar(
        tar,
        [
            ("000.jpg", jpg),
            ("000.cls", b"7\n"),
            ("000.json", json.dumps({"license": "cc-by-4.0", "url": "https://a.example/0.jpg"}).encode()),
            ("001.png", png),
            ("001.json", json.dumps({"license": "proprietary"}).encode()),
            ("002.jpg", other),  # no license of its own: the metadata file gives one
            ("003.txt", b"a caption without an image"),
            ("004.jpg", small),
            ("004.json", json.dumps({"license": "CC0-1.0"}).encode()),
        ],
    )
    parquet = str(tmp / "web.parquet")
    table = pa.table(
        {
            "key": ["p0", "p1", "p2", "p3"],
            "url": ["https://b.example/0.jpg", "https://b.example/1.jpg", None, "https://b.example/3.jpg"],
            "jpg": [jpg, None, encode(photo(), "WEBP"), truncated],
            "license": ["CC0-1.0", "CC0-1.0", "cc-by-4.0", "CC0-1.0"],
            "label": [1, 2, 3, 4],
        }
    )
    pq.write_table(table, parquet, row_group_size=2)
    meta = tmp / "meta.jsonl"
    meta.write_text(json.dumps({"key": "data.tar/002", "license": "CC0-1.0", "label": 5}) + "\n\n")
    out = str(tmp / "out")
    manifest = build.build_shards(
        [tar, parquet], out, metadata=str(meta), licenses=["CC-BY-4.0", "cc0-1.0"], min_side=64
    )
    return dict(out=out, tar=tar, parquet=parquet, manifest=manifest, rows=_rows(out), jpg=jpg, other=other)


def test_tar_and_parquet_rows(mixed):
    rows = mixed["rows"]
    assert set(rows) == {"data.tar/000", "data.tar/002", "web.parquet/p2"}
    r = rows["data.tar/000"]  # also in the parquet as p0: the smaller key is kept
    assert (r["image"], r["label"], r["license"]) == (mixed["jpg"], 7, "cc-by-4.0")
    assert r["source"] == "https://a.example/0.jpg"
    r = rows["data.tar/002"]
    assert (r["image"], r["label"], r["license"]) == (mixed["other"], 5, "CC0-1.0")
    assert r["source"] == f"{mixed['tar']}/002.jpg"
    r = rows["web.parquet/p2"]
    assert (r["format"], r["label"], r["license"]) == ("webp", 3, "cc-by-4.0")
    assert r["source"] == f"{mixed['parquet']}#2"


def test_tar_and_parquet_counts(mixed):
    m = mixed["manifest"]
    want = {reason: 0 for reason in SKIP_REASONS}
    want.update(filtered=1, too_small=1, duplicate=1, empty=1, corrupt=1)
    assert m.skipped == want
    assert m.licenses == {"CC0-1.0": 1, "cc-by-4.0": 2}
    assert m.sources == [mixed["tar"], mixed["parquet"]]
    assert m.written == 3 and len(m.shards) == 1
    assert m.metadata_unmatched == 0


# ---------------------------------------------------------------- dedup moves hashes, not images


def test_dedup_shuffles_no_image_bytes(tmp_path, ray_local):
    src = tmp_path / "big"
    images = {f"{i}.png": encode(photo(160 + 8 * i), "PNG") for i in range(4)}
    images["z_copy.png"] = images["1.png"]
    for name, data in images.items():
        write_file(str(src / name), data)
    plan = build.plan_build([str(src)], str(tmp_path / "out"), shard_size=2)
    m = build.run_build(plan)
    assert m.written == 4 and m.skipped["duplicate"] == 1
    assert set(_rows(str(tmp_path / "out"))) == {f"big/{i}.png" for i in range(4)}  # the smaller key kept
    # Ray Data's stats: the shuffle moved a few dozen bytes per image, less than any one image
    assert 0 < plan.shuffled_bytes < min(len(d) for d in images.values())
    assert f"dedup shuffled {plan.shuffled_bytes:,} bytes" in build.format_summary(m, plan)


# ---------------------------------------------------------------- a crash midway


def test_crash_midway_leaves_no_manifest(tmp_path, ray_local, monkeypatch):
    src = tmp_path / "few"
    for i, size in enumerate((64, 72, 80, 88, 96, 104)):
        write_file(str(src / f"{i}.png"), encode(photo(size), "PNG"))
    write_file(str(src / "again.png"), encode(photo(64), "PNG"))  # same bytes as 0.png
    out = str(tmp_path / "out")
    first = build.build_shards([str(src)], out, shard_size=2, dedup=False)
    assert first.written == 7 and first.skipped["duplicate"] == 0
    monkeypatch.setenv(build.FAIL_AFTER_ENV, "1")
    with pytest.raises(Exception, match="simulated crash"):
        build.build_shards([str(src)], out, shard_size=2, overwrite=True)
    assert not os.path.exists(os.path.join(out, MANIFEST))
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(out)
    # the next build cleans up what the crashed one left
    monkeypatch.delenv(build.FAIL_AFTER_ENV)
    again = build.build_shards([str(src)], out, shard_size=2)
    assert again.written == 6 and again.skipped["duplicate"] == 1
    # the crashed build's index name is not reused: a run that pinned it gets a clear error, not other shards
    assert again.index_file == "index-1.parquet" != INDEX
    assert sorted(os.listdir(out)) == sorted([MANIFEST, again.index_file] + [s["file"] for s in again.shards])
    assert set(_rows(out)) == {f"few/{i}.png" for i in range(6)}  # "again.png" sorts after "0.png"


# ---------------------------------------------------------------- a folder per class, read as training reads it


def test_class_folders_give_training_batches_of_every_class(tmp_path, ray_local):
    """Images laid out as a folder per class (paths sort by class) and labeled by --metadata,
    built and read as a training worker reads them (rows shuffled within windows of 2
    shards): every batch of 16 holds most of the 8 classes, as a full shuffle would, and
    not the one or two classes of two one-class shards. The same seed rebuilds the same
    shards."""
    from PIL import Image

    from raysl.data import reader

    src = tmp_path / "classes"
    lines = ["path,label"]
    for c in range(8):
        for i in range(16):
            img = Image.new("RGB", (8, 8), (32 * c, 16 * i, 7))
            write_file(str(src / str(c) / f"{i:02d}.png"), encode(img, "PNG"))
            lines.append(f"{c}/{i:02d}.png,{c}")
    meta = tmp_path / "labels.csv"
    meta.write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    m = build.build_shards([str(src)], out, shard_size=16, metadata=str(meta))
    assert m.written == 128
    labels = [r["label"] for r in reader.read_rows(out, seed=0, window=2).take_all()]
    per_batch = [len(set(labels[b : b + 16])) for b in range(0, len(labels), 16)]
    assert len(labels) == 128 and min(per_batch) >= 4, per_batch

    def keys_per_shard():
        return [pq.read_table(p).column("key").to_pylist() for p in shard_paths(out, read_manifest(out))]

    first = keys_per_shard()
    build.build_shards([str(src)], out, shard_size=16, metadata=str(meta), overwrite=True)
    assert keys_per_shard() == first
