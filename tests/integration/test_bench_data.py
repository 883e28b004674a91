"""`raysl bench data` runs end to end on a tiny shard set (no timed asserts)."""

import io
import json
import os

import pytest
import skimage.data
from PIL import Image
from shardfactory import write_shards

# real photographs shipped in scikit-image; no people, as in the demo's pool
PHOTOS = ["chelsea.png", "coffee.png", "rocket.jpg", "brick.png", "motorcycle_left.png", "hubble_deep_field.jpg"]


def write_tiny_shards(directory: str, per_shard: int = 3) -> int:
    """The photos re-encoded as small JPEGs, written as two shards."""
    images = []
    for name in PHOTOS:
        img = Image.open(os.path.join(os.path.dirname(skimage.data.__file__), name)).convert("RGB")
        img.thumbnail((160, 160))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        images.append((f"skimage/{name}", buf.getvalue(), None))
    write_shards(directory, images, shard_size=per_shard)
    return len(images)


def test_bench_data_reports_both_pipelines(tmp_path, ray_local, capsys):
    from raysl.bench.data import main, run_data_bench

    rows = write_tiny_shards(str(tmp_path))
    # 6 rows in batches of 4: one batch per epoch, so raysl's timed images cross epochs
    result = run_data_bench(str(tmp_path), "dino", workers=2, images=8, batch_size=4, seed=1)
    assert result["bench"] == "data" and result["views"] == "dino" and result["n_views"] == 10
    assert result["workers"] == 2 and result["images"] == 8 and result["rows"] == rows
    assert result["raysl_img_s"] > 0 and result["baseline_img_s"] > 0
    assert result["ratio"] == pytest.approx(
        result["raysl_img_s"] / result["baseline_img_s"], rel=0.01, abs=1e-3
    )  # ratios are rounded to 3 places
    sides = ["raysl_timed", "baseline_timed"]
    try:
        import lightly  # noqa: F401  (the `bench` extra)
    except ImportError:
        assert result["lightly"] is None and "lightly_img_s" not in result
    else:  # lightly's DINOTransform(n_local_views=8) in the same DataLoader
        assert result["lightly"] == "DINOTransform" and result["lightly_img_s"] > 0
        assert result["ratio_lightly"] == pytest.approx(
            result["raysl_img_s"] / result["lightly_img_s"], rel=0.01, abs=1e-3
        )
        spread = result["ratio_lightly_spread"]
        assert spread["min"] <= result["ratio_lightly"] <= spread["max"]
        sides.append("lightly_timed")
    sides.append("raysl_cold")  # the first raysl turn (Ray's workers start), kept out of the ratios
    for side in sides:
        timed = result[side]
        assert timed["images"] >= 8 and timed["seconds"] > 0 and timed["fill_s"] > 0
    timed = result["raysl_timed"]  # its seconds are rounded to 3 places: a few ms for 8 images here
    slowest, fastest = timed["images"] / (timed["seconds"] + 5e-4), timed["images"] / max(timed["seconds"] - 5e-4, 1e-9)
    assert slowest * 0.95 <= result["raysl_img_s"] <= fastest * 1.05
    json.dumps(result)

    main(["--shards", str(tmp_path), "--views", "simclr", "--workers", "1", "--images", "4", "--batch-size", "2"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(line)["views"] == "simclr"
