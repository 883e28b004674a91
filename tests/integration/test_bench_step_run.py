"""`raysl bench step` runs end to end on a tiny model on the local Ray (no timed asserts)."""

import json

import pytest


def test_bench_step_reports_both_sides(ray_local):
    from raysl.bench.step import run_step_bench

    res = run_step_bench("test_resnet", batch_size=4, image_size=32, steps=3, warmup=1, threads=1)
    assert res["bench"] == "step" and res["model"] == "test_resnet"
    assert (res["batch_size"], res["image_size"], res["threads"], res["steps"], res["warmup"]) == (4, 32, 1, 3, 1)
    assert (res["optimizer"], res["zero_stage"]) == ("adamw", 0)
    for side in ("baseline", "raysl"):
        assert res[f"{side}_step_s"] > 0 and res[f"{side}_mean_s"] > 0
        assert 0 < res[f"{side}_min_s"] <= res[f"{side}_step_s"]
        assert res[f"{side}_cpu_s"] > 0
        assert res[f"{side}_img_s"] == pytest.approx(4 / res[f"{side}_step_s"], rel=0.01)
    assert res["overhead"] == pytest.approx(res["raysl_step_s"] / res["baseline_step_s"] - 1, abs=1e-3)
    assert res["cpu_overhead"] == pytest.approx(res["raysl_cpu_s"] / res["baseline_cpu_s"] - 1, abs=1e-3)
    assert res["worker_nice"] == res["baseline_nice"]  # both sides compete for CPU on the same terms
    # both sides train the same method on the same weights and views
    assert res["raysl_loss_first"] == pytest.approx(res["baseline_loss_first"], rel=1e-4)
    assert res["raysl_loss_last"] == pytest.approx(res["baseline_loss_last"], rel=1e-2)
    assert res["worker_torch_threads"] == 1
    json.dumps(res)
