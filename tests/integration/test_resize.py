"""A run resumed on another number of workers (real Ray Train runs, gloo, DeepSpeed): it goes on
from the checkpoint's step, every image of the epoch it resumed in is trained on once, and with
the global batch kept the losses are the uninterrupted run's. The keys each worker trained on
are recorded by a callback that only reads the batches (the run's own loop, unchanged)."""

import os
import shutil

import pytest
from resize_run import each_image_once, keys_of, run
from runfactory import train_config

from raysl.train import recovery, storage
from raysl.train.metrics import read_metrics


def _losses(run_dir: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def _start_from(old: str, new_run: str, step: int) -> None:
    """A new run directory holding only `old`'s checkpoint of `step` (and its shard pins)."""
    os.makedirs(new_run)
    (ckpt,) = [c for c in storage.subdirs(old, "checkpoint_") if storage.checkpoint_step(f"{old}/{c}") == step]
    shutil.copytree(f"{old}/{ckpt}", f"{new_run}/{ckpt}")
    shutil.copy(f"{old}/shard_sets.json", new_run)


@pytest.mark.parametrize("zero", [2])
def test_a_run_resumed_on_fewer_then_more_workers_trains_the_same_images_and_losses(
    ray_local, train_shards, tmp_path, monkeypatch, zero
):
    # 64 images in 8 shards; 2 workers x batch 4: an epoch of 8 steps; 14 steps over 2 epochs
    storage_path = str(tmp_path / "runs")
    overrides = [
        "method.name=simsiam",  # a loss of each micro-batch alone: the same images give the same loss
        "model.backbone=test_vit",
        "method.proj_hidden_dim=32",
        "method.proj_dim=16",
        "method.pred_hidden_dim=8",
        "optim.name=adamw",
        f"deepspeed.zero_stage={zero}",
        "train.keep_checkpoints=10",
    ]
    # 1. uninterrupted on 2 workers, checkpoints at 4, 8, 12, 14
    base = run(monkeypatch, train_config(train_shards, storage_path, "base", *overrides), str(tmp_path / "base.jsonl"))
    ref_keys, ref = keys_of(str(tmp_path / "base.jsonl")), _losses(base)
    assert sorted(ref) == list(range(1, 15))

    # 2. its step-4 checkpoint (epoch 0 half done) resumed on 1 worker: 2 micro-batches of 4 a step
    _start_from(base, f"{storage_path}/one", 4)
    one_cfg = train_config(train_shards, storage_path, "one", *overrides, "train.num_workers=1")
    one = run(monkeypatch, one_cfg, str(tmp_path / "one.jsonl"), resume=True)
    attempts = recovery.read_attempts(one)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in attempts] == [(4, 5, 1)]
    one_keys, one_losses = keys_of(str(tmp_path / "one.jsonl")), _losses(one)
    assert sorted(one_keys) == list(range(5, 15))
    # the rest of epoch 0: the uninterrupted run's images, step by step, and its losses
    assert [one_keys[s] for s in range(5, 9)] == [ref_keys[s] for s in range(5, 9)]
    for s in range(5, 9):
        assert one_losses[s] == pytest.approx(ref[s], rel=1e-4), s
    epoch0 = [k for s in range(1, 5) for k in ref_keys[s]] + [k for s in range(5, 9) for k in one_keys[s]]
    assert len(epoch0) == len(set(epoch0)) == 64  # every image of epoch 0 once
    epoch1 = [k for s in range(9, 15) for k in one_keys[s]]
    assert len(epoch1) == len(set(epoch1)) == 6 * 8  # epoch 1, planned on 1 worker: no image twice

    # 3. the 1-worker run's step-12 checkpoint (epoch 1 half done) resumed on 2 workers: each takes
    # half of every step, a worker that had no part in the checkpoint included
    _start_from(one, f"{storage_path}/two", 12)
    two_cfg = train_config(train_shards, storage_path, "two", *overrides, "train.num_workers=2")
    two = run(monkeypatch, two_cfg, str(tmp_path / "two.jsonl"), resume=True)
    assert [(a["start_step"], a["first_step"]) for a in recovery.read_attempts(two)] == [(12, 13)]
    two_keys, two_losses = keys_of(str(tmp_path / "two.jsonl")), _losses(two)
    assert [two_keys[s] for s in (13, 14)] == [one_keys[s] for s in (13, 14)]
    for s in (13, 14):
        assert two_losses[s] == pytest.approx(one_losses[s], rel=1e-4), s


# ZeRO-2: tests/drills/test_resize_apart.py (ZeRO-1 cuts and loads its partitions with the same
# DeepSpeed optimizer and the same files as ZeRO-2); every stage's state: tests/drills/test_reshard.py
@pytest.mark.parametrize("zero", [0, 3])
def test_adamw8bit_under_zero_resumes_on_one_worker_of_two(ray_local, train_shards, tmp_path, monkeypatch, zero):
    """The recipe's 8-bit optimizer, its ZeRO partitions cut anew for 1 worker (the state itself:
    tests/drills/test_reshard.py): the run goes on from the checkpoint's step and the epoch's
    images are each trained on once."""
    storage_path, overrides = str(tmp_path / "runs"), [f"deepspeed.zero_stage={zero}", "train.max_steps=4"]
    base = run(monkeypatch, train_config(train_shards, storage_path, "base", *overrides), str(tmp_path / "b.jsonl"))
    one_cfg = train_config(train_shards, storage_path, "base", *overrides, "train.num_workers=1", "train.max_steps=8")
    run(monkeypatch, one_cfg, str(tmp_path / "one.jsonl"), resume=True)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(base)][1:] == [
        (4, 5, 1)
    ]
    before, after = keys_of(str(tmp_path / "b.jsonl")), keys_of(str(tmp_path / "one.jsonl"))
    assert sorted(after) == [5, 6, 7, 8]
    assert len(each_image_once(*before.values(), *after.values())) == 64  # all of epoch 0 (8 steps of 8)
