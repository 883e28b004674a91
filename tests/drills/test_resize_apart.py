"""Runs of more workers than the session's Ray holds (3 and 4, each worker 1 CPU), one after the
other in a process of their own with a local Ray of 4 logical CPUs (tests/resize_run.py): a
checkpoint of 2 workers goes on with 3, and one of 4 with 2, each image of the epoch trained on once."""

from resize_run import each_image_once, keys_of, run, run_apart
from runfactory import train_config

from raysl.train import recovery


def test_a_run_of_two_workers_goes_on_with_three_and_one_of_four_with_two(
    ray_local, train_shards, tmp_path, monkeypatch
):
    """More workers than the checkpoint's, and fewer from more, with the recipe (ZeRO-2,
    AdamW8bit): the 3- and 4-worker runs in one process and Ray of their own (4 logical CPUs)."""
    storage_path = str(tmp_path / "runs")
    # 2 -> 3: a global batch of 8 does not split over 3 workers reading 2 streams: 6 (3 x 2)
    base = run(monkeypatch, train_config(train_shards, storage_path, "grow", "train.max_steps=4"), str(tmp_path / "g"))
    three = train_config(train_shards, storage_path, "grow", "train.num_workers=3", "train.max_steps=7")
    # 4 -> 2: 4 workers x batch 4, an epoch of 4 steps; its step-2 checkpoint resumed on 2. The
    # 3- and the 4-worker run, one after the other in one process and Ray
    four = train_config(train_shards, storage_path, "shrink", "train.num_workers=4", "train.max_steps=2")
    _, shrunk = run_apart((three, str(tmp_path / "g3"), True), (four, str(tmp_path / "s4"), False), cpus=4)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(base)][1:] == [
        (4, 5, 3)
    ]
    before, after = keys_of(str(tmp_path / "g")), keys_of(str(tmp_path / "g3"))
    assert sorted(after) == [5, 6, 7] and all(len(after[s]) == 6 for s in after)
    each_image_once(*before.values(), *after.values())  # steps 5-7 are still epoch 0: 32 + 18 images

    two = train_config(train_shards, storage_path, "shrink", "train.max_steps=4")
    run(monkeypatch, two, str(tmp_path / "s2"), resume=True)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(shrunk)] == [
        (0, 1, 4),
        (2, 3, 2),
    ]
    before, after = keys_of(str(tmp_path / "s4")), keys_of(str(tmp_path / "s2"))
    assert sorted(after) == [3, 4] and all(len(after[s]) == 16 for s in after)
    assert len(each_image_once(*before.values(), *after.values())) == 64  # the whole epoch, once
