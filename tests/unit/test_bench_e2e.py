"""`raysl bench e2e`'s digit shard set on a tiny size. Its plain loop runs in
tests/integration/test_bench_e2e_loop.py (a DataLoader worker process)."""

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from raysl.bench import e2e
from raysl.data.schema import read_manifest, shard_paths


def test_digit_shards_are_distinct_32px_rgb_pngs_of_28px_digits(tmp_path):
    d = e2e.write_digit_shards(str(tmp_path / "d"), 30, seed=1)
    m = read_manifest(d)
    rows = pq.read_table(shard_paths(d, m)[0]).to_pylist()
    assert len(rows) == 30 and len({r["sha256"] for r in rows}) == 30
    img = np.asarray(Image.open(__import__("io").BytesIO(rows[0]["image"])))
    assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 1]).all()  # grey as RGB
    assert img[:2].max() == 0 and img[:, :2].max() == 0  # 28 x 28 inside a 2 px border
    assert e2e.write_digit_shards(d, 30) == d  # kept, not rewritten
