"""`raysl bench data` runs end to end on a tiny shard set (no timed asserts)."""

import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from raysl.data.schema import SCHEMA, Manifest, write_manifest

PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "motorcycle_left.png", "hubble_deep_field.jpg"]


def write_tiny_shards(directory: str, per_shard: int = 3) -> int:
    """Real skimage photos re-encoded as small JPEGs, written as two parquet shards."""
    rows = []
    for name in PHOTOS:
        img = Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)).convert("RGB")
        img.thumbnail((160, 160))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        rows.append((f"skimage/{name}", buf.getvalue(), img.size))
    manifest = Manifest(sources=["skimage"])
    for n in range(0, len(rows), per_shard):
        chunk = rows[n : n + per_shard]
        table = pa.table(
            {
                "key": [k for k, _, _ in chunk],
                "image": [b for _, b, _ in chunk],
                "sha256": [hashlib.sha256(b).hexdigest() for _, b, _ in chunk],
                "width": [s[0] for _, _, s in chunk],
                "height": [s[1] for _, _, s in chunk],
                "format": ["jpeg"] * len(chunk),
                "source": ["skimage"] * len(chunk),
                "license": ["bsd-3-clause"] * len(chunk),
                "attribution": ["scikit-image"] * len(chunk),
                "label": [None] * len(chunk),
            },
            schema=SCHEMA,
        )
        name = f"shard-{n // per_shard:05d}.parquet"
        pq.write_table(table, os.path.join(directory, name))
        manifest.shards.append({"file": name, "rows": len(chunk)})
    manifest.written = len(rows)
    write_manifest(directory, manifest)
    return len(rows)


@pytest.mark.ray
def test_bench_data_reports_both_pipelines(tmp_path, ray_local, capsys):
    from raysl.bench.data import main, run_data_bench

    rows = write_tiny_shards(str(tmp_path))
    result = run_data_bench(str(tmp_path), "dino", workers=2, images=8, batch_size=4, seed=1)
    assert result["bench"] == "data" and result["views"] == "dino" and result["n_views"] == 10
    assert result["workers"] == 2 and result["images"] == 8 and result["rows"] == rows
    assert result["raysl_img_s"] > 0 and result["baseline_img_s"] > 0
    assert result["ratio"] == pytest.approx(result["raysl_img_s"] / result["baseline_img_s"], rel=0.01)
    for side in ("raysl_timed", "baseline_timed"):
        timed = result[side]
        assert timed["images"] >= 8 and 0 < timed["first_batch_s"] <= timed["seconds"]
    assert result["raysl_img_s"] == pytest.approx(result["raysl_timed"]["images"] / result["raysl_timed"]["seconds"], rel=0.05)
    json.dumps(result)

    main([str(tmp_path), "--views", "simclr", "--workers", "1", "--images", "4", "--batch-size", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["views"] == "simclr"
