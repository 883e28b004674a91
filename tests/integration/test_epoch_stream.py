"""One Ray Data execution across epochs gives each epoch exactly the batches its own
per-epoch stream gives: the same images, positions and views per step, from a resumed
position too, with an epoch's unused rows dropped and a corrupt image skipped and counted."""

import os

import numpy as np
import pytest
from shardfactory import digit_images, write_shards

from raysl.data import epochs, reader
from raysl.data.view_plans import view_spec

SPEC = view_spec("simclr", size=32)
BATCH = 4


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    images = digit_images(46)
    images[20] = ("digits/broken.png", images[20][1][:40], 0)  # a truncated PNG: dropped at decode
    d = str(tmp_path_factory.mktemp("shards"))
    write_shards(d, images, shard_size=7)  # 7 shards: 7 x 6 + 4
    return d


def _views(shards, epoch, start, n=1):
    return reader.read_views(shards, SPEC, seed=3, epoch=epoch, rank=1, world_size=2, start=start, epochs=n)


def _own_streams(shards, steps: dict[int, int], start: int) -> dict[int, list[dict]]:
    """What one execution per epoch gives: each epoch's first `steps` batches."""
    out = {}
    for e, n in steps.items():
        at = start if e == min(steps) else 0
        batches = reader.ViewBatches(_views(shards, e, at), batch_size=BATCH, start=at)
        out[e] = [b for _, b in zip(range(n), batches)]
    return out


def _same(a: dict, b: dict) -> bool:
    return a.keys() - {"epoch"} == b.keys() - {"epoch"} and all(np.array_equal(a[k], b[k]) for k in a if k != "epoch")


@pytest.mark.parametrize("start", [0, 5])
def test_one_execution_gives_every_epoch_its_own_streams_batches(ray_local, shards, start):
    steps = {2: 4, 3: 5, 4: 2}  # epoch 4 ends early (train.max_steps): its other rows are never trained
    want = _own_streams(shards, steps, start)
    assert all(want[e] for e in steps)
    streams = epochs.Streams(lambda e, s, n: _views(shards, e, s, n), lambda e: 3, batch_size=BATCH)
    for e, n in steps.items():
        at = start if e == 2 else 0
        batches = streams.batches(e, at)
        got = [b for _, b in zip(range(n), batches)]
        assert len(got) == len(want[e])
        assert all(_same(g, w) for g, w in zip(got, want[e])), e
        own = reader.ViewBatches(_views(shards, e, at), batch_size=BATCH, start=at)
        for _ in zip(range(n), own):
            pass
        assert (batches.position, batches.skipped) == (own.position, own.skipped)
    assert streams.run is not None and streams.run.first_epoch == 2  # one execution served all three


def test_an_epoch_asked_for_again_from_its_start_gets_a_new_execution(ray_local, shards):
    streams = epochs.Streams(lambda e, s, n: _views(shards, e, s, n), lambda e: 4, batch_size=BATCH)
    first = list(streams.batches(0, 0))
    again = list(streams.batches(0, 0))  # corrupt images thinned the epoch: the trainer starts it over
    assert len(first) == len(again) > 0 and all(_same(a, b) for a, b in zip(first, again))
    ahead = streams.run
    assert list(streams.batches(1, 0)) and streams.run is ahead  # epoch 1 from the same execution


def test_a_cached_set_streams_the_same_batches_without_reading_its_files(ray_local, shards, tmp_path):
    import shutil

    from raysl.data import cache
    from raysl.data.schema import read_manifest

    copy = str(tmp_path / "copy")
    shutil.copytree(shards, copy)
    manifest = read_manifest(copy)
    assert cache.fits(manifest, 0.05) and not cache.fits(manifest, 0.0)
    refs = cache.put_set(copy, manifest, reader.READ_COLUMNS)
    for name in manifest.shards.files():
        os.remove(os.path.join(copy, name))  # from here on, only the object store has the rows

    def views(cached):
        return reader.read_views(copy, SPEC, seed=3, epoch=1, rank=1, world_size=2, epochs=2, cache=cached)

    streams = epochs.Streams(lambda e, s, n: views(refs), lambda e: 2, batch_size=BATCH)
    want = _own_streams(shards, {1: 99, 2: 99}, 0)  # every batch of each epoch
    for e in (1, 2):
        got = list(streams.batches(e, 0))
        assert len(got) == len(want[e]) > 2 and all(_same(g, w) for g, w in zip(got, want[e])), e
    with pytest.raises(Exception, match="shard-0000"):
        views(None).take_all()  # without the cache the files are gone
    # from the object store one read task at a time: each further one would be a process of its own
    assert _read_op(views(refs)).compute.size == 1
    assert _read_op(reader.read_views(shards, SPEC, concurrency=2)).compute.size == 2


def _read_op(ds):
    op = ds._logical_plan.dag
    while "_read_windows" not in op.name:
        op = op.input_dependencies[0]
    return op
