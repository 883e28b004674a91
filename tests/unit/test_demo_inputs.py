"""`raysl demo`'s inputs: the bundled photographs copied byte for byte, the labeled digits
split and labeled."""

import csv
import os

from PIL import Image

from raysl.data import demo_images


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
