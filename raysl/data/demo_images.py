"""Real images that ship inside installed wheels: the demo's pretraining pool and a
real labeled evaluation set. Nothing here downloads anything.

Pretraining pool: photographs bundled with scikit-image and scikit-learn, each with
the licence and attribution their packages document. Following PASS, pictures of
people (astronaut, camera, the GIF, the LFW faces) stay out of the pool.
"""

from __future__ import annotations

import csv
import io
import os
import shutil

# file -> (licence, attribution), from the docstrings/READMEs of the packages.
SKIMAGE = {
    "brick.png": ("cc0-1.0", "CC0Textures (Bricks25), via scikit-image"),
    "chelsea.png": ("cc0-1.0", "Stefan van der Walt, via scikit-image"),
    "coffee.png": ("cc0-1.0", "Rachel Michetti, via scikit-image"),
    "coins.png": ("no-known-restrictions", "Brooklyn Museum, via scikit-image"),
    "grass.png": ("cc0-1.0", "CC0Textures, via scikit-image"),
    "gravel.png": ("cc0-1.0", "CC0Textures (Gravel04), via scikit-image"),
    "hubble_deep_field.jpg": ("public-domain", "NASA, via scikit-image"),
    "ihc.png": ("no-known-restrictions", "Center for Microscopy and Molecular Imaging, via scikit-image"),
    "retina.jpg": ("cc0-1.0", "Mikael Häggström, via scikit-image"),
    "rocket.jpg": ("public-domain", "SpaceX, via scikit-image"),
    "microaneurysms.png": ("cc0-1.0", "Andreas Maier, via scikit-image"),
    "cell.png": ("cc0-1.0", "Schürmann, Guck et al., via scikit-image"),
    "horse.png": ("cc0-1.0", "Andreas Preuss, via scikit-image"),
    "clock_motion.png": ("public-domain", "Stefan van der Walt, via scikit-image"),
    "text.png": ("public-domain", "via scikit-image"),
    "motorcycle_left.png": ("", "Middlebury 2014 stereo benchmark, via scikit-image"),
    "motorcycle_right.png": ("", "Middlebury 2014 stereo benchmark, via scikit-image"),
    "moon.png": ("", "via scikit-image"),
    "page.png": ("", "via scikit-image"),
}
SKLEARN = {
    "china.jpg": ("cc-by-2.0", "danielbuechele (Flickr), via scikit-learn"),
    "flower.jpg": ("cc-by-2.0", "vultilion (Flickr), via scikit-learn"),
}
OPEN_LICENSES = ["cc0-1.0", "public-domain", "cc-by-2.0", "no-known-restrictions"]


def data_dirs() -> dict[str, str]:
    import skimage.data
    import sklearn.datasets

    return {
        "skimage": os.path.dirname(skimage.data.__file__),
        "sklearn": os.path.join(os.path.dirname(sklearn.datasets.__file__), "images"),
    }


def copy_pool(out_dir: str) -> str:
    """Copy the pool's files byte for byte into out_dir/images and write out_dir/metadata.csv
    (path, license, attribution, source). Returns the images folder."""
    dirs = data_dirs()
    images = os.path.join(out_dir, "images")
    os.makedirs(images, exist_ok=True)
    with open(os.path.join(out_dir, "metadata.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "license", "attribution", "source"])
        for pkg, table in (("skimage", SKIMAGE), ("sklearn", SKLEARN)):
            for name, (lic, attribution) in table.items():
                src = os.path.join(dirs[pkg], name)
                if not os.path.exists(src):  # a package release without this file
                    continue
                dst = os.path.join(images, f"{pkg}_{name}")
                shutil.copyfile(src, dst)
                w.writerow([os.path.abspath(dst), lic, attribution, f"{pkg}:{name}"])
    return images


DIGITS_LICENSE = ("cc-by-4.0", "UCI ML hand-written digits, via scikit-learn")


def digit_pngs(size: int = 32, limit: int | None = None) -> list[tuple[bytes, int]]:
    """scikit-learn's 1,797 real handwritten digits (8x8 grey, 10 classes), upscaled to
    `size` (bicubic) and PNG-encoded: [(png bytes, label)], the first `limit` only if given."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    out = []
    for pixels, label in zip(digits.images[:limit], digits.target[:limit]):
        img = Image.fromarray((pixels * 16).clip(0, 255).astype(np.uint8)).resize(
            (size, size), Image.Resampling.BICUBIC
        )
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append((buf.getvalue(), int(label)))
    return out


def write_digits(
    out_dir: str, *, size: int = 32, val_every: int = 5, limit: int | None = None
) -> dict[str, tuple[str, str]]:
    """The digits of `digit_pngs` as PNG files: a labeled evaluation set. Every
    `val_every`-th digit goes to the validation split. Writes out_dir/digits_{train,val}/NNNN.png
    and, next to each folder, digits_{train,val}.csv (path, label, license, attribution)
    for `--metadata`. `limit` keeps only the first digits (tests).
    Returns {"train": (folder, csv), "val": (folder, csv)}."""
    splits = {}
    for split in ("train", "val"):
        folder = os.path.join(out_dir, f"digits_{split}")
        os.makedirs(folder, exist_ok=True)
        splits[split] = (folder, os.path.join(out_dir, f"digits_{split}.csv"))
    files = {split: open(csv_path, "w", newline="") for split, (_, csv_path) in splits.items()}  # noqa: SIM115 (closed below)
    try:
        writers = {split: csv.writer(f) for split, f in files.items()}
        for w in writers.values():
            w.writerow(["path", "label", "license", "attribution"])
        for i, (png, label) in enumerate(digit_pngs(size, limit)):
            split = "val" if i % val_every == val_every - 1 else "train"
            path = os.path.join(splits[split][0], f"{i:04d}.png")
            with open(path, "wb") as g:
                g.write(png)
            writers[split].writerow([os.path.abspath(path), label, *DIGITS_LICENSE])
    finally:
        for f in files.values():
            f.close()
    return splits
