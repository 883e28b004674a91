"""The streaming reader on the local Ray: seeded, shuffled, resumable, disjoint across workers,
through pyarrow filesystems, and flowing while training workers hold every CPU."""

import numpy as np
import pytest
from shardfactory import digit_images, write_shards

from raysl.data import reader
from raysl.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    write_shards(d, digit_images(40), shard_size=7)  # 6 shards: 7,7,7,7,7,5
    return d


def _stream(shards, **kw):
    return reader.read_rows(shards, **kw).take_all()


def test_stream_is_seeded_shuffled_and_resumable(ray_local, shards):
    a = _stream(shards, seed=3, epoch=0)
    b = _stream(shards, seed=3, epoch=0)
    keys = [r["key"] for r in a]
    assert keys == [r["key"] for r in b]  # deterministic for a seed
    assert sorted(keys) == sorted(k for k, _, _ in digit_images(40))  # every image exactly once
    assert keys != [r["key"] for r in _stream(shards, seed=3, epoch=1)]  # reshuffled per epoch
    assert keys != sorted(keys)
    assert [r["pos"] for r in a] == list(range(40))
    # labels and bytes come through untouched
    want = {k: (b_, lab) for k, b_, lab in digit_images(40)}
    assert all(want[r["key"]] == (r["image"], r["label"]) for r in a)
    # resuming at a saved position replays exactly the rest of the stream
    for start in (0, 5, 14, 33):
        rest = _stream(shards, seed=3, epoch=0, start=start)
        assert [r["key"] for r in rest] == keys[start:]
        assert [r["aug_seed"] for r in rest] == [r["aug_seed"] for r in a[start:]]
    with pytest.raises(UserError, match="past the end"):
        _stream(shards, seed=3, epoch=0, start=40)


def test_two_workers_cover_the_epoch_disjointly(ray_local, shards):
    parts = [[r["key"] for r in _stream(shards, seed=0, epoch=0, rank=r, world_size=2)] for r in range(2)]
    assert not set(parts[0]) & set(parts[1])
    assert len(parts[0]) + len(parts[1]) == 40


def test_augment_seed_depends_on_image_not_worker(ray_local, shards):
    one = {r["key"]: r["aug_seed"] for r in _stream(shards, seed=0, epoch=0)}
    two = {}
    for r in range(2):
        two.update({row["key"]: row["aug_seed"] for row in _stream(shards, seed=0, epoch=0, rank=r, world_size=2)})
    assert one == two
    assert len(set(one.values())) == 40


def test_view_batches_tracks_position_and_skips(ray_local, tmp_path):
    images = digit_images(12)
    images[3] = ("digits/broken.png", images[3][1][:40], 0)  # truncated PNG
    d = str(tmp_path / "s")
    write_shards(d, images, shard_size=6)
    from raysl.data.view_plans import view_spec

    spec = view_spec("eval", size=32)
    batches = reader.ViewBatches(reader.read_views(d, spec, seed=0), batch_size=4)
    got = list(batches)
    assert len(got) == 2  # 11 good images -> two full batches of 4, the rest dropped
    assert all(b["view_0"].shape == (4, 3, 32, 32) and b["view_0"].dtype == np.uint8 for b in got)
    broken_pos = next(r["pos"] for r in _stream(d, seed=0) if r["key"] == "digits/broken.png")
    assert batches.position - batches.skipped == 8  # consumed = delivered + skipped
    assert batches.skipped == int(broken_pos < batches.position)
    assert "digits/broken.png" not in {k for b in got for k in b["key"]}


def test_view_batches_shorten_ray_datas_wait_for_finished_tasks(ray_local, shards):
    """Ray Data's executor, in the consuming process, waits up to 0.1 s for all its running
    tasks before it submits the next (augment tasks then sit idle 30% of the time); a
    view stream lowers that wait. An AttributeError here: Ray moved it, see TASK_WAIT_S."""
    from ray.data._internal.execution import streaming_executor_state as executor

    from raysl.data.view_plans import view_spec

    saved = executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S
    executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = 0.1  # Ray 2.60's own value
    try:
        batches = reader.ViewBatches(reader.read_views(shards, view_spec("eval", size=32), seed=0), batch_size=4)
        assert executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S == reader.TASK_WAIT_S < 0.1
        assert len(next(iter(batches))["view_0"]) == 4
    finally:
        executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = saved


def test_reads_through_a_pyarrow_filesystem_uri(ray_local, shards):
    # file:// goes through pyarrow.fs.FileSystem.from_uri, the same path as s3:// and gs://
    uri = "file://" + shards
    assert [r["key"] for r in _stream(uri, seed=2)] == [r["key"] for r in _stream(shards, seed=2)]


def test_a_window_reaches_the_augment_step_in_batch_sized_blocks(ray_local, shards):
    """One shuffle window (here all 40 rows) must not reach the augment step as one block,
    which one task would augment alone: it is split into blocks of one augment batch, in
    stream order, so `concurrency` tasks can work on it side by side."""
    from raysl.data.view_plans import view_spec

    spec = view_spec("mae", size=16)
    ds = reader.read_views(shards, spec, seed=3, window=6, batch_size=8, concurrency=2).materialize()
    assert ds.num_blocks() == 5
    rows = ds.take_all()
    assert [r["pos"] for r in rows] == list(range(40))
    assert [r["key"] for r in rows] == [r["key"] for r in _stream(shards, seed=3, window=6)]


def test_views_flow_while_training_workers_hold_every_cpu(ray_local, shards):
    """Training on one machine: the workers hold every CPU and the data tasks reserve none
    (data.task_cpus 0). Splitting a window into blocks must not add a task that needs one."""
    from raysl.data.view_plans import view_spec

    @ray_local.remote(num_cpus=2)
    class Holder:
        def ping(self):
            return 1

    holder = Holder.remote()
    ray_local.get(holder.ping.remote())
    try:
        ds = reader.read_views(shards, view_spec("mae", size=16), window=6, batch_size=8, num_cpus=0.0, concurrency=2)
        assert [r["pos"] for r in ds.take_all()] == list(range(40))
    finally:
        ray_local.kill(holder)


def test_reads_are_bounded_like_the_augment_step_and_stay_fused(ray_local, shards):
    """Each concurrent data task holds a worker process that imports the views' dependencies:
    read tasks take the augment bound too (never above the window count, which Ray Data
    would warn about), and the block split stays fused into the read task."""
    import warnings

    from raysl.data.view_plans import view_spec

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = reader.read_views(shards, view_spec("mae", size=16), window=3, batch_size=8, concurrency=4)
        assert [r["pos"] for r in ds.take_all()] == list(range(40))
    assert not [w for w in caught if "concurrent tasks" in str(w.message)]
    augment = ds._logical_plan.dag
    split = augment.input_dependencies[0]
    read = split.input_dependencies[0]
    assert (augment.compute.size, split.compute.size, read.compute.size) == (4, 2, 2)  # 2 windows of 3 shards
    assert "MapBatches(_read_windows)->StreamingRepartition" in ds.stats()


def test_a_pixel_stream_decodes_as_the_views_do_and_drops_what_does_not_decode(ray_local, tmp_path):
    """data.augment_on=worker: the tasks stop at the decode; the batches keep their fixed
    shape, position and skip count as the view stream's do."""
    from raysl.data.decode import decode_pixels
    from raysl.data.view_plans import PLAN_FIELDS, decode_plans, plan_views, view_spec

    images = digit_images(12)
    images[3] = ("digits/broken.png", images[3][1][:40], 0)  # truncated PNG
    d = str(tmp_path / "s")
    write_shards(d, images, shard_size=6)
    spec = view_spec("simclr", size=32)
    batches = reader.ViewBatches(reader.read_views(d, spec, seed=0, pixels_only=True), batch_size=4)
    got = list(batches)
    assert len(got) == 2 and all(len(b["pixels"]) == 4 and "view_0" not in b for b in got)
    rows = {r["key"]: r for r in _stream(d, seed=0)}
    for b in got:
        for key, px, seed in zip(b["key"], b["pixels"], b["aug_seed"]):
            np.testing.assert_array_equal(px, decode_pixels(rows[key]["image"], min_side=spec.min_decode_side()))
            assert seed == rows[key]["aug_seed"]
        # each row's plans, drawn in the task from its seed for its decoded size
        assert b["plans"].shape == (4, spec.n_views, PLAN_FIELDS)
        assert decode_plans(b["plans"]) == [
            plan_views(spec, s, px.shape[1], px.shape[0]) for s, px in zip(b["aug_seed"], b["pixels"])
        ]
    assert batches.position - batches.skipped == 8
    assert batches.skipped == int(rows["digits/broken.png"]["pos"] < batches.position)
    assert "digits/broken.png" not in {k for b in got for k in b["key"]}


def test_batches_reach_the_model_as_ray_datas_own_memory_without_a_warning(ray_local, shards):
    """No copy between Ray Data and normalize: a batch is a read-only slice of its block
    (numpy refuses writes to it) and block_tensor wraps that memory without torch's
    not-writable warning."""
    import warnings

    from raysl.data.view_plans import view_spec
    from raysl.data.views import block_tensor

    ds = reader.read_views(shards, view_spec("eval", size=32), seed=0, batch_size=8)
    batch = next(iter(reader.ViewBatches(ds, batch_size=4)))
    view = batch["view_0"]
    assert not view.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = block_tensor(view)
    assert tensor.data_ptr() == view.ctypes.data and tensor.shape == view.shape
