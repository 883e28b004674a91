"""A run resumed on another number of workers (real Ray Train runs, gloo, DeepSpeed): it goes on
from the checkpoint's step, every image of the epoch it resumed in is trained on once, and with
the global batch kept the losses are the uninterrupted run's. The keys each worker trained on
are recorded by a callback that only reads the batches (the run's own loop, unchanged)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from resize_run import recording_loop
from runfactory import train_config

import raysl.pretrain
from raysl.pretrain import pretrain
from raysl.train import recovery, storage
from raysl.train.metrics import read_metrics

HERE = os.path.dirname(os.path.dirname(__file__))


def _run(monkeypatch, cfg, keys_file: str, *, resume: bool = False) -> str:
    monkeypatch.setattr(raysl.pretrain, "train_loop_per_worker", recording_loop(keys_file))
    return pretrain(cfg, resume=resume)["run_dir"]


def _keys(keys_file: str) -> dict[int, list[str]]:
    """step -> the keys of its global batch (ranks in order)."""
    rows = [json.loads(line) for line in open(keys_file)]
    out: dict[int, list[str]] = {}
    for r in sorted(rows, key=lambda r: (r["step"], r["rank"])):
        out.setdefault(r["step"], []).extend(r["keys"])
    return out


def _losses(run: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def _start_from(run: str, new_run: str, step: int) -> None:
    """A new run directory holding only `run`'s checkpoint of `step` (and its shard pins)."""
    os.makedirs(new_run)
    (ckpt,) = [c for c in storage.subdirs(run, "checkpoint_") if storage.checkpoint_step(f"{run}/{c}") == step]
    shutil.copytree(f"{run}/{ckpt}", f"{new_run}/{ckpt}")
    shutil.copy(f"{run}/shard_sets.json", new_run)


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
    base = _run(monkeypatch, train_config(train_shards, storage_path, "base", *overrides), str(tmp_path / "base.jsonl"))
    ref_keys, ref = _keys(str(tmp_path / "base.jsonl")), _losses(base)
    assert sorted(ref) == list(range(1, 15))

    # 2. its step-4 checkpoint (epoch 0 half done) resumed on 1 worker: 2 micro-batches of 4 a step
    _start_from(base, f"{storage_path}/one", 4)
    one_cfg = train_config(train_shards, storage_path, "one", *overrides, "train.num_workers=1")
    one = _run(monkeypatch, one_cfg, str(tmp_path / "one.jsonl"), resume=True)
    attempts = recovery.read_attempts(one)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in attempts] == [(4, 5, 1)]
    one_keys, one_losses = _keys(str(tmp_path / "one.jsonl")), _losses(one)
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
    two = _run(monkeypatch, two_cfg, str(tmp_path / "two.jsonl"), resume=True)
    assert [(a["start_step"], a["first_step"]) for a in recovery.read_attempts(two)] == [(12, 13)]
    two_keys, two_losses = _keys(str(tmp_path / "two.jsonl")), _losses(two)
    assert [two_keys[s] for s in (13, 14)] == [one_keys[s] for s in (13, 14)]
    for s in (13, 14):
        assert two_losses[s] == pytest.approx(one_losses[s], rel=1e-4), s


def _run_apart(cfg, keys_file: str, cpus: int, *, resume: bool = False) -> str:
    """The run in its own process and local Ray of `cpus` logical CPUs (tests/resize_run.py)."""
    from raysl.pretrain import run_dir

    config = keys_file + ".yaml"
    with open(config, "w") as f:
        f.write(cfg.to_yaml())
    cmd = [sys.executable, os.path.join(HERE, "resize_run.py"), config, keys_file, str(cpus)]
    done = subprocess.run(cmd + (["--resume"] if resume else []), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return run_dir(cfg)


def _each_image_once(*steps: list[str]) -> list[str]:
    keys = [k for step in steps for k in step]
    assert len(keys) == len(set(keys)), "an image trained on twice in one epoch"
    return keys


@pytest.mark.parametrize("zero", [1, 3])  # ZeRO-2: the test below; every stage's state: test_reshard.py
def test_adamw8bit_under_zero_resumes_on_one_worker_of_two(ray_local, train_shards, tmp_path, monkeypatch, zero):
    """The recipe's 8-bit optimizer, its ZeRO partitions cut anew for 1 worker (the state itself:
    tests/drills/test_reshard.py): the run goes on from the checkpoint's step and the epoch's
    images are each trained on once."""
    storage_path, overrides = str(tmp_path / "runs"), [f"deepspeed.zero_stage={zero}", "train.max_steps=4"]
    base = _run(monkeypatch, train_config(train_shards, storage_path, "base", *overrides), str(tmp_path / "b.jsonl"))
    one_cfg = train_config(train_shards, storage_path, "base", *overrides, "train.num_workers=1", "train.max_steps=8")
    _run(monkeypatch, one_cfg, str(tmp_path / "one.jsonl"), resume=True)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(base)][1:] == [
        (4, 5, 1)
    ]
    before, after = _keys(str(tmp_path / "b.jsonl")), _keys(str(tmp_path / "one.jsonl"))
    assert sorted(after) == [5, 6, 7, 8]
    assert len(_each_image_once(*before.values(), *after.values())) == 64  # all of epoch 0 (8 steps of 8)


def test_a_run_of_two_workers_goes_on_with_three_and_one_of_four_with_two(
    ray_local, train_shards, tmp_path, monkeypatch
):
    """More workers than the checkpoint's, and fewer from more, with the recipe (ZeRO-2,
    AdamW8bit): the 3- and 4-worker runs in their own process and Ray (4 logical CPUs)."""
    storage_path = str(tmp_path / "runs")
    # 2 -> 3: a global batch of 8 does not split over 3 workers reading 2 streams: 6 (3 x 2)
    base = _run(monkeypatch, train_config(train_shards, storage_path, "grow", "train.max_steps=4"), str(tmp_path / "g"))
    three = train_config(train_shards, storage_path, "grow", "train.num_workers=3", "train.max_steps=7")
    _run_apart(three, str(tmp_path / "g3"), cpus=4, resume=True)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(base)][1:] == [
        (4, 5, 3)
    ]
    before, after = _keys(str(tmp_path / "g")), _keys(str(tmp_path / "g3"))
    assert sorted(after) == [5, 6, 7] and all(len(after[s]) == 6 for s in after)
    _each_image_once(*before.values(), *after.values())  # steps 5-7 are still epoch 0: 32 + 18 images

    # 4 -> 2: 4 workers x batch 4, an epoch of 4 steps; its step-2 checkpoint resumed on 2
    four = train_config(train_shards, storage_path, "shrink", "train.num_workers=4", "train.max_steps=2")
    run = _run_apart(four, str(tmp_path / "s4"), cpus=4)
    two = train_config(train_shards, storage_path, "shrink", "train.max_steps=4")
    _run(monkeypatch, two, str(tmp_path / "s2"), resume=True)
    assert [(a["start_step"], a["first_step"], a["world_size"]) for a in recovery.read_attempts(run)] == [
        (0, 1, 4),
        (2, 3, 2),
    ]
    before, after = _keys(str(tmp_path / "s4")), _keys(str(tmp_path / "s2"))
    assert sorted(after) == [3, 4] and all(len(after[s]) == 16 for s in after)
    assert len(_each_image_once(*before.values(), *after.values())) == 64  # the whole epoch, once
