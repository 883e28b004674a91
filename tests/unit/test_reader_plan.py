"""The reader's plan without Ray: every shard once per epoch, a clear error with more workers
than shards, and whole training batches per augment task."""

import pytest
from shardfactory import digit_images, write_shards

from raysl.data import reader
from raysl.data.schema import read_manifest
from raysl.errors import UserError


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    write_shards(d, digit_images(40), shard_size=7)  # 6 shards: 7,7,7,7,7,5
    return d


def test_plan_partitions_every_shard_once_per_epoch(shards):
    m = read_manifest(shards)
    for epoch in range(3):
        plans = [reader.worker_shards(m, seed=1, epoch=epoch, rank=r, world_size=2) for r in range(2)]
        assert sorted(plans[0] + plans[1]) == list(range(6))
    assert reader.worker_shards(m, seed=1, epoch=0, rank=0, world_size=2) != reader.worker_shards(
        m, seed=1, epoch=1, rank=0, world_size=2
    ) or reader.worker_shards(m, seed=1, epoch=2, rank=0, world_size=2) != reader.worker_shards(
        m, seed=1, epoch=0, rank=0, world_size=2
    ), "shard order must be reshuffled across epochs"
    assert (
        reader.steps_per_epoch(m, batch_size=4, seed=1, epoch=0, world_size=2)
        == min(reader.rows_per_worker(m, seed=1, epoch=0, world_size=2)) // 4
    )


def test_more_workers_than_shards_is_a_clear_error(shards):
    with pytest.raises(UserError, match="6 shard"):
        reader.worker_shards(read_manifest(shards), seed=0, epoch=0, rank=0, world_size=7)


def test_an_augment_task_makes_whole_training_batches_up_to_64_mib():
    from raysl.data.view_plans import view_spec

    simclr32_batch = 128 * 2 * 3 * 32 * 32  # 786 KB: 8 batches a block (the cap)
    assert reader.block_rows(view_spec("simclr", size=32), 128) == 128 * reader.MAX_BATCHES_PER_BLOCK
    simclr_batch = 32 * 2 * 3 * 224 * 224  # 9.6 MB: 6 batches in 64 MiB
    assert reader.block_rows(view_spec("simclr"), 32) == 32 * (reader.MAX_BLOCK_BYTES // simclr_batch) == 192
    assert simclr32_batch * reader.MAX_BATCHES_PER_BLOCK < reader.MAX_BLOCK_BYTES
    dino_row = 2 * 3 * 224 * 224 + 8 * 3 * 96 * 96  # 522 KB of uint8 views
    assert reader.block_rows(view_spec("dino"), 128) == 128  # 66.8 MB: one batch just fits
    assert reader.block_rows(view_spec("dino"), 512) == reader.MAX_BLOCK_BYTES // dino_row == 128  # part of one
