"""`raysl bench checkpoint` at CI size, on the session's S3 server: every figure it promises."""

import json

import pytest

from raysl.bench.checkpoint import run_checkpoint_bench

PARAMS = 2_000_000  # ZeRO-2 + AdamW8bit, as the recipes train


@pytest.mark.timeout(600)
def test_bench_checkpoint_reports_every_figure(ray_local, s3):
    out = run_checkpoint_bench(params=PARAMS, workers=2, steps=2, warmup=1, restore_workers=(1, 2))
    for key in (
        "step_s_idle",
        "step_s_during_upload_sync",
        "step_s_checkpoint_async",
        "step_s_during_upload_async",
        "upload_bytes",
        "upload_s",
        "upload_cpu_s",
        "upload_server_cpu_s",
        "restore_bytes_per_worker",
        "cpu_per_s_idle",
        "cpu_per_s_during_upload_async",
    ):
        assert key in out, key
    assert out["step_s_idle"] > 0 and out["step_s_during_upload_sync"] > 0 and out["upload_s"] > 0
    assert out["upload_bytes"] > 4 * PARAMS  # fp32 weights at least
    assert out["upload_cpu_s"] > 0  # the client's own work, apart from the S3 server's
    for side in ("cpu_per_s_idle", "cpu_per_s_during_upload_async"):
        assert len(out[side]) == 2  # one per worker
        for worker in out[side]:
            if worker is None and side.endswith("async") and out["step_s_during_upload_async"] is None:
                continue  # the upload ended before a step could run beside it
            assert 0 < worker["thread_cpu"] <= worker["worker_cpu"] <= worker["machine_busy"], (side, worker)
            assert worker["thread_wait_cpu"] >= 0 and worker["wall"] > 0
    assert len(out["restore_bytes_per_worker"]) == 2
    one, two = out["restore_bytes_per_worker"]
    assert two <= one  # a worker of two downloads no more than a lone worker
    json.dumps(out)
