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


def test_shares_count_the_data_wait_of_each_epochs_first_step_as_its_turn():
    # 5 steps of 1 s over 3 epochs: the waits of steps 3 and 5 (the first of epochs 1 and 2) are turns
    out = e2e._shares(10.0, [1.0] * 5, [0.5, 0.0, 0.3, 0.0, 0.2], [0, 0, 1, 1, 2])
    assert out["epochs"] == 3 and out["epoch_turn_s"] == 0.5 and out["data_wait_s"] == 1.0
    assert out["startup_s"] == 5.0 and out["epoch_turn_share"] == 0.05
