"""The data plan of an epoch resumed on another number of workers (raysl.data.plan), without Ray:
the streams are simulated with the reader's own pure functions over an in-memory shard index,
and each worker's rows come out of plan.PlanBatches as the trainer takes them."""

import numpy as np
import pytest

from raysl.data import plan, reader
from raysl.data.schema import Manifest
from raysl.data.shard_index import ShardIndex
from raysl.errors import UserError

SEED, EPOCH, WINDOW = 3, 1, 2
ROWS = [7, 7, 6, 7, 5, 7, 7, 6, 7, 7, 7, 5]  # 12 shards, 78 rows


def manifest() -> Manifest:
    return Manifest(shards=ShardIndex.from_columns([f"shard-{i:05d}.parquet" for i in range(len(ROWS))], ROWS))


def stream(m: Manifest, v: int, streams: int) -> np.ndarray:
    """Keys of stream v of `streams` in reading order, as read_rows makes it: the stream's
    shards in windows of WINDOW, each window's rows in reader.window_order."""
    shards = reader.worker_shards(m, seed=SEED, epoch=EPOCH, rank=v, world_size=streams)
    keys = []
    for w in range(0, len(shards), WINDOW):
        rows = [f"{i}/{r}" for i in shards[w : w + WINDOW] for r in range(ROWS[i])]
        keys += [rows[j] for j in reader.window_order(SEED, EPOCH, w, len(rows))]
    return np.array(keys)


class FakeViews:
    """What read_views gives a worker: a stream's rows from `start`, those `keep` selects (the
    reader's own filter), less the `broken` keys (images that do not decode), in batches."""

    def __init__(self, keys: np.ndarray, start: int, keep, broken=()):
        pos = np.arange(start, len(keys))
        pos = pos[reader.kept(pos, start, keep)]
        pos = pos[~np.isin(keys[pos], list(broken))]
        self.rows = {"key": keys[pos], "pos": pos}

    def iter_batches(self, *, batch_size, **_):
        for i in range(0, len(self.rows["pos"]), batch_size):
            yield {k: v[i : i + batch_size] for k, v in self.rows.items()}


def run_streams(keys, per_stream, steps, consumed):
    """The uninterrupted run's global batch of each step from `consumed`: stream by stream."""
    return [
        np.concatenate([k[c + s * per_stream : c + (s + 1) * per_stream] for k, c in zip(keys, consumed)])
        for s in range(steps)
    ]


def worker_batches(keys, consumed, batching: plan.Batching, steps: int, broken=()):
    """Each worker's rows of each step, as PlanBatches hands them to the trainer (micro-batches joined)."""
    streams = len(keys)
    per_stream = batching.global_batch // streams
    out = []
    for j in range(batching.workers):
        batches = plan.PlanBatches(
            lambda v, start, keep: FakeViews(keys[v], start, keep, broken),
            slices=plan.worker_slices(streams, per_stream, batching.workers, j),
            consumed=consumed,
            per_stream=per_stream,
            micro=batching.micro,
        )
        micro = list(batches)[: steps * batching.accum]
        assert all(len(b["key"]) == batching.micro for b in micro)
        a = batching.accum
        out.append([np.concatenate([b["key"] for b in micro[s * a : (s + 1) * a]]) for s in range(steps)])
    return out


@pytest.mark.parametrize("streams", [2, 3, 4])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_an_epoch_resumed_on_another_worker_count_reads_every_remaining_row_once(streams, workers):
    m = manifest()
    keys = [stream(m, v, streams) for v in range(streams)]
    rows = reader.rows_per_worker(m, seed=SEED, epoch=EPOCH, world_size=streams)
    assert [len(k) for k in keys] == rows  # the simulation is the reader's stream
    batch_size = 4  # data.batch_size; grad_accum 1
    per_stream = batch_size
    done = 2  # steps of the epoch before the checkpoint
    consumed = [done * per_stream] * streams
    batching = plan.keep_global_batch(streams * per_stream, streams, workers, batch_size)
    g = batching.global_batch
    assert g <= streams * per_stream and g % streams == 0 and batching.micro <= batch_size
    left = plan.steps_left(rows, consumed, g // streams)
    assert left > 0
    parts = worker_batches(keys, consumed, batching, left)
    steps = [np.concatenate([p[s] for p in parts]) for s in range(left)]
    # each worker's slice is its range of the step's global batch
    for j, p in enumerate(parts):
        assert all(len(b) == g // workers for b in p)
    trained = np.concatenate(steps)
    assert len(set(trained)) == len(trained)  # no row twice
    remaining = np.concatenate([k[c:] for k, c in zip(keys, consumed)])
    assert set(trained) <= set(remaining)
    # dropped at the epoch's end, beyond what the streams' different lengths drop: under one global batch
    assert streams * (min(rows) - consumed[0]) - len(trained) < g
    if g == streams * per_stream:  # the global batch kept: every step trains the uninterrupted run's images
        assert [list(s) for s in steps] == [list(s) for s in run_streams(keys, per_stream, left, consumed)]


def test_a_resize_inside_a_resized_epoch_composes():
    """2 streams: 2 steps on 2 workers, 3 on 1 worker, the rest on 4: the uninterrupted run's steps."""
    m = manifest()
    keys = [stream(m, v, 2) for v in range(2)]
    rows = reader.rows_per_worker(m, seed=SEED, epoch=EPOCH, world_size=2)
    one = plan.keep_global_batch(8, 2, 1, 4)
    assert (one.micro, one.accum) == (4, 2)
    first = worker_batches(keys, [8, 8], one, 3)
    four = plan.keep_global_batch(8, 2, 4, 4)
    assert (four.micro, four.accum) == (2, 1)
    left = plan.steps_left(rows, [20, 20], 4)
    rest = worker_batches(keys, [20, 20], four, left)
    steps = [first[0][s] for s in range(3)] + [np.concatenate([p[s] for p in rest]) for s in range(left)]
    assert [list(s) for s in steps] == [list(s) for s in run_streams(keys, 4, 3 + left, [8, 8])]


def test_a_row_that_does_not_decode_is_replaced_by_a_repeat_keeping_the_shape():
    m = manifest()
    keys = [stream(m, v, 2) for v in range(2)]
    batching = plan.keep_global_batch(8, 2, 1, 4)
    broken = {keys[1][9]}  # stream 1's second row of the first step after position 8
    (steps,) = worker_batches(keys, [8, 8], batching, 2, broken=broken)
    want = run_streams(keys, 4, 2, [8, 8])
    assert len(steps[0]) == 8 and broken.isdisjoint(steps[0]) and len(set(steps[0])) == 7
    assert set(steps[0]) == set(want[0]) - broken and list(steps[1]) == list(want[1])


def test_batching_keeps_the_global_batch_or_the_nearest_smaller_that_splits():
    assert plan.keep_global_batch(16, 2, 2, 8) == plan.Batching(2, 8, 1)  # the same workers: as configured
    assert plan.keep_global_batch(16, 2, 1, 8) == plan.Batching(1, 8, 2)
    assert plan.keep_global_batch(16, 2, 4, 8) == plan.Batching(4, 4, 1)  # 16 / 4 < one micro-batch of 8
    assert plan.keep_global_batch(16, 2, 3, 8) == plan.Batching(3, 4, 1)  # 12: 3 workers x 4, 2 streams x 6
    assert plan.keep_worker_batch(2, 1, 8, 1) == plan.Batching(1, 8, 1)
    assert plan.keep_worker_batch(2, 3, 8, 1) == plan.Batching(3, 8, 1)  # 24 splits over 2 streams
    assert plan.keep_worker_batch(3, 2, 8, 1).global_batch == 12  # 16 does not split over 3 streams
    with pytest.raises(UserError, match="train.num_workers=3"):
        plan.keep_global_batch(2, 3, 2, 1)


def test_worker_slices_cover_the_global_batch_in_order():
    for streams in (2, 3, 4):
        for workers in (1, 2, 3, 4, 6):
            g = 12 * streams
            cover = [
                s.stream * 12 + i
                for j in range(workers)
                for s in plan.worker_slices(streams, 12, workers, j)
                for i in range(s.lo, s.hi)
            ]
            assert cover == list(range(g))
            assert all(
                len(plan.worker_slices(streams, 12, workers, j)) <= -(-streams // workers) + 1 for j in range(workers)
            )
