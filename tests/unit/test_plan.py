"""Planning costs one pass: one permutation per epoch for all ranks, the same streams as the
per-rank planning it replaces, and no epochs planned past train.max_steps."""

import numpy as np
import pytest
from shardfactory import digit_images, write_shards

from raysl.config import load_config
from raysl.data import legacy, reader
from raysl.data.schema import Manifest
from raysl.data.shard_index import ShardIndex


def _manifest(n, seed=0):
    rows = np.random.default_rng(seed).integers(1, 50, n)
    return Manifest(shards=ShardIndex.from_columns([f"shard-{i:05d}.parquet" for i in range(n)], rows))


def _per_rank(m, seed, epoch, world):
    """The planning before this change: every rank permutes all shards and sums its share."""
    rows = m.shards.rows.tolist()
    plans = [np.random.default_rng([seed, epoch]).permutation(len(rows))[r::world].tolist() for r in range(world)]
    return plans, [sum(rows[i] for i in p) for p in plans]


@pytest.mark.parametrize("n, world", [(1, 1), (7, 2), (10, 3), (64, 64), (101, 8)])
def test_one_pass_gives_the_per_rank_plan(n, world):
    m = _manifest(n, seed=n)
    for seed, epoch in [(0, 0), (5, 3)]:
        plans, shares = _per_rank(m, seed, epoch, world)
        assert [
            reader.worker_shards(m, seed=seed, epoch=epoch, rank=r, world_size=world) for r in range(world)
        ] == plans
        assert reader.rows_per_worker(m, seed=seed, epoch=epoch, world_size=world) == shares
        old = legacy.ManifestV1(shards=[{"file": f, "rows": int(r)} for f, r in zip(m.shards.files(), m.shards.rows)])
        assert (
            reader.steps_per_epoch(m, batch_size=3, seed=seed, epoch=epoch, world_size=world)
            == min(shares) // 3
            == legacy.steps_per_epoch_v1(old, batch_size=3, seed=seed, epoch=epoch, world_size=world)
        )


def test_steps_per_epoch_permutes_once_for_all_ranks(monkeypatch):
    calls = []
    real = reader.shard_order
    monkeypatch.setattr(reader, "shard_order", lambda *a, **k: calls.append(k) or real(*a, **k))
    reader.steps_per_epoch(_manifest(100), batch_size=2, seed=0, epoch=0, world_size=16)
    assert len(calls) == 1


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    write_shards(d, digit_images(40), shard_size=5)  # 8 shards of 5
    return d


def test_epoch_steps_stop_at_max_steps(shards, monkeypatch):
    from raysl.train import steps as loop

    cfg = load_config("quickstart", [f"data.shards={shards}", "data.batch_size=4", "train.epochs=100"])
    planned = []
    real = reader.steps_per_epoch
    monkeypatch.setattr(reader, "steps_per_epoch", lambda *a, **k: planned.append(k["epoch"]) or real(*a, **k))
    every = loop.epoch_steps(cfg, 2, cfg.train.epochs)  # no max_steps: every epoch, 20 rows per worker
    assert every == [5] * 100 and len(planned) == 100
    planned.clear()
    cfg.train.max_steps = 12
    assert loop.epoch_steps(cfg, 2, cfg.train.epochs) == [5, 5, 5] and planned == [0, 1, 2]
    assert loop.total_steps(cfg, 2) == 12
    cfg.train.max_steps = 10_000  # more than the epochs give: all of them, as before
    assert loop.total_steps(cfg, 2) == 500
