"""`raysl bench e2e`'s pieces on a tiny size (no timed asserts): the digit shard set and
the plain loop's accounting. The raysl side is `raysl pretrain`, tested in test_train."""

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


def test_plain_loop_takes_the_steps_and_accounts_for_its_wall_time(tmp_path):
    d = e2e.write_digit_shards(str(tmp_path / "d"), 24, seed=0)
    cfg = e2e._config(d, str(tmp_path / "runs"), model="test_resnet", batch_size=8, steps=4, seed=0, name="p")
    out = e2e.run_plain(cfg, 4, workers=1)
    assert out["steps"] == 4 and np.isfinite(out["final_loss"])
    parts = out["startup_s"] + out["data_wait_s"] + out["compute_s"]
    assert abs(parts - out["wall_s"]) < 0.05
    assert abs(sum(out["shares"].values()) - 1) < 0.01
