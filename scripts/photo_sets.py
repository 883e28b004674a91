"""A folder of real photographs for `raysl bench data`, made from the pool bundled with
scikit-image/scikit-learn (`raysl.data.demo_images`), nothing downloaded.

    python scripts/photo_sets.py photos800 --images 800            # 500 x 375 JPEGs (q 90)
    python scripts/photo_sets.py photos33 --images 33 --mixed      # each crop at its own size
    raysl shards build photos800 --out S800

Without `--mixed` the JPEGs are `gpu_views.make_jpegs`' (random crops of 30-100% of the
area, resized to 500 x 375); with it each crop keeps the size it was cut at, as a folder
of a user's own photographs of many sizes would.
"""

from __future__ import annotations

import argparse
import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def mixed_jpegs(n: int, seed: int = 0) -> list[bytes]:
    """n JPEGs (q 90) cut at random (area 30-100%) from the pool's photographs, not resized."""
    import numpy as np
    from PIL import Image

    from raysl.data.demo_images import SKIMAGE, SKLEARN, data_dirs

    dirs = data_dirs()
    photos = [
        Image.open(os.path.join(dirs[pkg], name)).convert("RGB")
        for pkg, table in (("skimage", SKIMAGE), ("sklearn", SKLEARN))
        for name in table
        if os.path.exists(os.path.join(dirs[pkg], name))
    ]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = np.sqrt(rng.uniform(0.3, 1.0))
        cw, ch = max(8, int(w * side)), max(8, int(h * side))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        buf = io.BytesIO()
        img.crop((left, top, left + cw, top + ch)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def main() -> None:
    from gpu_views import make_jpegs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write photo_NNNNN.jpg into")
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--mixed", action="store_true", help="keep each crop's own size (default: 500 x 375)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jpegs = mixed_jpegs(args.images, args.seed) if args.mixed else make_jpegs(args.images, args.seed)
    for i, data in enumerate(jpegs):
        with open(os.path.join(args.out, f"photo_{i:05d}.jpg"), "wb") as f:
            f.write(data)
    print(f"{len(jpegs)} JPEGs in {args.out}")


if __name__ == "__main__":
    main()
