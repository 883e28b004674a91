"""Checkpoints on a bucket (moto's S3 server): each worker downloads only what it loads, so a
restore moves the same bytes per worker at 2 and at 4 workers; a run on the bucket resumes
from its newest checkpoint; and `raysl bench checkpoint` at CI size."""

import json
import re

import pytest
from runfactory import train_config

from raysl.bench.checkpoint import restore_bytes, run_checkpoint_bench
from raysl.pretrain import pretrain
from raysl.train import recovery, storage

PARAMS = 2_000_000  # ZeRO-2 + AdamW8bit, as the recipes train
OPTIM = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


def test_restore_moves_the_same_bytes_per_worker_at_2_and_4_workers(s3):
    bucket = s3.bucket()
    got = {w: restore_bytes(PARAMS, w, f"{bucket}/w{w}/checkpoint_x") for w in (2, 4)}
    for world, ranks in got.items():
        stored = storage.listing(f"{bucket}/w{world}/checkpoint_x")
        assert len([n for n in stored if OPTIM.search(n)]) == world  # every rank's partition is in the bucket
        for rank, r in enumerate(ranks):
            assert r["step"] == 1  # the checkpoint loaded on every rank
            partitions = [int(m.group(1)) for n in r["files"] if (m := OPTIM.search(n))]
            assert partitions == [rank], (world, rank, r["files"])  # its own, never another rank's
            assert "weights.safetensors" not in r["files"]
            assert not any(n.startswith("worker_") and n != f"worker_{rank}.pt" for n in r["files"])
    per_rank = {w: max(r["bytes"] for r in ranks) for w, ranks in got.items()}
    # the shared model file is the same size at both; each optimizer partition halves from 2 to 4
    assert per_rank[4] <= per_rank[2], per_rank
    whole = {w: sum(i for i in [r["bytes"] for r in ranks]) for w, ranks in got.items()}
    assert whole[4] < 2 * whole[2], whole  # not every rank downloading the whole checkpoint


def test_a_run_on_the_bucket_resumes_from_its_newest_checkpoint(ray_local, s3, train_shards):
    bucket = s3.bucket()
    first = pretrain(train_config(train_shards, bucket, "run", "train.max_steps=4", "train.checkpoint_every=2"))
    run = first["run_dir"]
    assert run.startswith("s3://")
    newest, skipped = recovery.newest_complete(run)
    assert newest and not skipped and storage.checkpoint_step(newest) == 4
    pretrain(train_config(train_shards, bucket, "run", "train.max_steps=6", "train.checkpoint_every=2"), resume=True)
    files = storage.RunFiles(run, fetch=(recovery.ATTEMPTS, "metrics.jsonl"))
    try:
        attempts = recovery.read_attempts(files.local)
        with open(f"{files.local}/metrics.jsonl") as f:
            steps = [json.loads(line)["step"] for line in f if line.strip()]
    finally:
        files.close()
    assert [(a["start_step"], a["first_step"]) for a in attempts] == [(0, 1), (4, 5)]
    assert attempts[1]["checkpoint"] == newest.rsplit("/", 1)[1]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert storage.checkpoint_step(recovery.newest_complete(run)[0]) == 6


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
        "restore_bytes_per_worker",
    ):
        assert key in out, key
    assert out["step_s_idle"] > 0 and out["step_s_during_upload_sync"] > 0 and out["upload_s"] > 0
    assert out["upload_bytes"] > 4 * PARAMS  # fp32 weights at least
    assert len(out["restore_bytes_per_worker"]) == 2
    one, two = out["restore_bytes_per_worker"]
    assert two <= one  # a worker of two downloads no more than a lone worker
    json.dumps(out)
