"""Checkpoints on a bucket (moto's S3 server): each worker downloads only what it loads, so a
restore moves the same bytes per worker at 2 and at 4 workers (a run on the bucket resuming
from its newest checkpoint: tests/integration/test_buckets.py)."""

import re

from raysl.bench.checkpoint import restore_bytes
from raysl.train import storage

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
