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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    from gpu_views import make_jpegs

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder to write photo_NNNNN.jpg into")
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--mixed", action="store_true", help="keep each crop's own size (default: 500 x 375)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    jpegs = make_jpegs(args.images, args.seed, size=None if args.mixed else (500, 375))
    for i, data in enumerate(jpegs):
        with open(os.path.join(args.out, f"photo_{i:05d}.jpg"), "wb") as f:
            f.write(data)
    print(f"{len(jpegs)} JPEGs in {args.out}")


if __name__ == "__main__":
    main()
