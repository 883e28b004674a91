"""`raysl bench plan` at a tiny size: its keys, and plans equal to the reader's (no timings checked)."""

import numpy as np
import pytest

from raysl.bench.plan import run_plan_bench, simulated_manifest
from raysl.data import reader
from raysl.errors import UserError


def test_plans_match_the_reader_for_other_seeds_and_sizes():
    out = run_plan_bench(25, 4, 3, rows=12, batch_size=2, seed=7, baseline_epochs=3)  # baseline checked against it
    m = simulated_manifest(25, 12, seed=7)
    assert m.rows == sum(m.shards.rows) and 25 * 10 <= m.rows <= 25 * 12
    assert out["steps_per_epoch"] == [
        reader.steps_per_epoch(m, batch_size=2, seed=7, epoch=e, world_size=4) for e in range(3)
    ]


def test_bad_sizes_are_one_clear_error():
    with pytest.raises(UserError, match="--shards 2 is fewer than --workers 3"):
        run_plan_bench(2, 3, 1)
    with pytest.raises(UserError, match="--baseline-epochs"):
        run_plan_bench(4, 2, 1, baseline_epochs=2)


def test_sets_option_plans_the_same_shards_as_a_mixture():
    from raysl.data.schema import Manifest
    from raysl.data.shard_index import ShardIndex

    out = run_plan_bench(40, 3, 3, rows=20, batch_size=5, sets=2)
    m = simulated_manifest(40, 20)
    halves = [Manifest(shards=ShardIndex(m.shards.table.slice(a, 20))) for a in (0, 20)]
    want = []
    for e in range(3):  # weights 1 and 2: rounds of 1 + 2 rows, until the first set runs out
        rows = [np.array(reader.rows_per_worker(h, seed=0, epoch=e, world_size=3)) for h in halves]
        want.append(int(np.minimum(rows[0] // 1, rows[1] // 2).min()) * 3 // 5)
    assert out["mixture"]["steps_per_epoch"] == want and out["mixture"]["weights"] == [1.0, 2.0]
    assert "mixture" not in run_plan_bench(40, 3, 1, rows=20, batch_size=5)
    with pytest.raises(UserError, match="--sets 20: each set needs at least --workers 3"):
        run_plan_bench(40, 3, 1, sets=20)
