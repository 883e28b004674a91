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
    dirs = demo_images.data_dirs()
    expected = [
        f"{pkg}_{n}"
        for pkg, table in (("skimage", demo_images.SKIMAGE), ("sklearn", demo_images.SKLEARN))
        for n in table
        if os.path.exists(os.path.join(dirs[pkg], n))
    ]
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
    for folder, labels, idx in (
        (train, train_csv, [i for i in range(40) if i % 5 != 4]),
        (val, val_csv, range(4, 40, 5)),
    ):
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


# Lines of third-party noise that `raysl demo` used to print (issue 16)
NOISE = {
    "bitsandbytes": "Failed to load CPU gemm_4bit_forward",
    "numpy": "array is not writable",
    "ray data": "execution finished",
    "setuptools": "project.license",
}
NOISE_STDOUT_ONLY = {"ray core": "PreemptionWatcher"}  # Ray Train's C++ line on stderr: see raysl.runtime


def test_demo_ends_with_a_knn_table_and_commands_that_work_as_printed(tmp_path):
    """The whole `raysl demo` (one real local Ray, about 2 minutes), run from a working
    directory with a relative --out, as a new user would."""
    import json
    import shlex
    import subprocess
    import sys

    from raysl.cli import build_parser

    proc = subprocess.run(
        [sys.executable, "-m", "raysl.cli", "demo", "--out", "out"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.splitlines()

    # the two-row table holds what `raysl eval knn --baseline` measured and wrote to RUN/eval_knn.json
    with open(tmp_path / "out" / "runs" / "demo" / "eval_knn.json") as f:
        knn = json.load(f)
    start = out.index(next(line for line in out if line.startswith("backbone ")))
    header, random_row, trained_row = out[start : start + 3]
    assert header.split()[1:] == ["kNN", "top-1", "k=20", "kNN", "top-1", "k=200"]
    assert random_row.startswith("random init") and trained_row.startswith(f"pretrained, {knn['step']} steps")
    assert random_row.split()[-2:] == [f"{knn['random_init'][f'knn_top1_k{k}']:.1f}" for k in (20, 200)]
    assert trained_row.split()[-2:] == [f"{knn[f'knn_top1_k{k}']:.1f}" for k in (20, 200)]
    assert knn["random_init"] != {k: v for k, v in knn.items() if k.startswith("knn_")}  # two backbones, two results
    assert out[start + 3] == "report: out/runs/demo/report.html" and (tmp_path / "out/runs/demo/report.html").is_file()

    # the next commands parse, and every path in them is there (relative to where the demo ran)
    commands = [shlex.split(line.split("#")[0]) for line in out[start + 4 :] if line.startswith("raysl ")]
    assert [c[1] for c in commands] == ["eval", "export", "pretrain", "doctor"]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        ev, ex, pre = (build_parser().parse_args(c[1:]) for c in commands[:3])
    finally:
        os.chdir(cwd)
    for path in (ev.ckpt, ev.train, ev.val, ex.ckpt, os.path.dirname(ex.out)):
        assert path.startswith(str(tmp_path)) and os.path.isdir(path), path
    shards = next(o.split("=", 1)[1] for o in pre.overrides if o.startswith("data.shards="))
    assert (tmp_path / shards / "manifest.json").is_file()

    for name, text in {**NOISE, **NOISE_STDOUT_ONLY}.items():
        assert text not in proc.stdout, name
    for name, text in NOISE.items():
        assert text not in proc.stderr, name
