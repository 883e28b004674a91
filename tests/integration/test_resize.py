"""A run resumed on another number of workers (real Ray Train runs, gloo, DeepSpeed): it goes on
from the checkpoint's step, every image of the epoch it resumed in is trained on once, and with
the global batch kept the losses are the uninterrupted run's. The keys each worker trained on
are recorded by a callback that only reads the batches (the run's own loop, unchanged)."""

import json
import os
import shutil

import pytest
from runfactory import train_config

import raysl.pretrain
from raysl.pretrain import pretrain
from raysl.train import recovery, storage
from raysl.train.metrics import read_metrics

# ZeRO stages whose model and optimizer state load at another world size
ZERO_STAGES = [0]


def _recording_loop(keys_file: str):
    """The pretrain loop of every worker (raysl.pretrain.train_loop_per_worker), plus a callback
    writing the keys of each step's batches, per rank, to `keys_file`."""

    def loop(raw: dict) -> None:
        from raysl.config import from_dict
        from raysl.train.callback import Callback
        from raysl.train.trainer import Trainer

        class Keys(Callback):
            def setup(self, trainer) -> None:
                self.keys: list[str] = []
                to_batch = trainer.to_batch

                def recorded(batch):
                    self.keys += [str(k) for k in batch["key"]]
                    return to_batch(batch)

                trainer.to_batch = recorded

            def on_step(self, trainer, out, metrics) -> None:
                with open(keys_file, "a") as f:
                    f.write(json.dumps({"step": trainer.state["step"], "rank": trainer.rank, "keys": self.keys}) + "\n")
                self.keys = []

        trainer = Trainer(from_dict(raw["config"]), raw["run_dir"], callbacks=[Keys()], pins=raw.get("shard_pins"))
        trainer.fit()

    return loop


def _run(monkeypatch, cfg, keys_file: str, *, resume: bool = False) -> str:
    monkeypatch.setattr(raysl.pretrain, "train_loop_per_worker", _recording_loop(keys_file))
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


@pytest.mark.parametrize("zero", ZERO_STAGES)
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
