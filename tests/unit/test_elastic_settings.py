"""Elastic runs without Ray: `train.num_workers` as a number or `[min, max]`, what validate() says of
each, and the one line a run without room for its min workers ends with."""

import os
import re

import pytest
from runfactory import train_config

from raysl.config import load_config
from raysl.data import mixture
from raysl.errors import UserError
from raysl.pretrain import validate
from raysl.train import elastic, recovery
from raysl.train.trainer import Trainer


@pytest.mark.parametrize(
    "value, error",
    [
        ("[0, 2]", "train.num_workers: 0 is out of range (must be >= 1)"),
        ("[3, 1]", "train.num_workers: [3, 1] must be [lo, hi] with lo <= hi"),
        ("[1, 2, 4]", "train.num_workers: expected a list of 2 numbers, e.g. [2, 8]"),
        ("0", "train.num_workers: 0 is out of range (must be >= 1)"),
    ],
)
def test_bad_worker_counts_are_one_error_naming_the_key(value, error):
    with pytest.raises(UserError, match=re.escape(error)):
        load_config("quickstart", [f"train.num_workers={value}"])


def test_a_number_is_a_fixed_run_and_a_pair_an_elastic_one():
    fixed = load_config("quickstart", ["train.num_workers=3"]).train
    assert (fixed.num_workers, fixed.min_workers, fixed.max_workers, fixed.elastic) == (3, 3, 3, False)
    ranged = load_config("quickstart", ["train.num_workers=[2, 8]"]).train
    assert (ranged.num_workers, ranged.min_workers, ranged.max_workers, ranged.elastic) == ([2, 8], 2, 8, True)


def test_validate_plans_a_range_at_its_max_and_refuses_it_for_a_mixture(train_shards, mixture_sets, tmp_path):
    validate(train_config(train_shards, tmp_path, "x", "train.num_workers=[1, 4]"))
    # 64 images: 1 worker of 16 images per step fits, 8 do not (8 images each)
    with pytest.raises(UserError, match="data.shards gives each of 8 worker"):
        validate(train_config(train_shards, tmp_path, "x", "train.num_workers=[1, 8]", "data.batch_size=16"))
    curated, web = mixture_sets
    with pytest.raises(UserError, match="train.num_workers: \\[1, 2\\] makes the run elastic, but data.shards is a"):
        validate(
            train_config(
                f"[{curated}, {web}]",
                tmp_path,
                "x",
                "train.num_workers=[1, 2]",
                "data.batch_size=2",
                "data.weights=[0.5, 0.5]",
            )
        )


def _new_run(cfg, world: int) -> Trainer:
    """A new run's plan on `world` workers (Trainer.plan_run), without Ray."""
    trainer = Trainer(cfg, "unused")
    trainer.world, trainer.rank = world, 0
    trainer.sets = mixture.from_config(cfg.data)
    trainer.plan_run(None)
    return trainer


@pytest.mark.parametrize(
    "workers, world, micro, accum", [("[1, 4]", 1, 4, 4), ("[1, 4]", 3, 4, 1), ("[2, 2]", 2, 4, 1), ("2", 2, 4, 1)]
)
def test_an_elastic_run_keeps_the_global_batch_of_its_max_whatever_it_starts_with(
    train_shards, tmp_path, workers, world, micro, accum
):
    """[1, 4] workers of batch 4: started on 1, the global batch of 4 workers (16) as 4 micro-batches;
    on 3, the nearest below that 3 workers train in whole micro-batches of 4 (12). A fixed count as before."""
    cfg = train_config(train_shards, tmp_path, "x", f"train.num_workers={workers}", "train.max_steps=0")
    trainer = _new_run(cfg, world)
    assert (trainer.batching.micro, trainer.batching.accum) == (micro, accum)
    assert trainer.state["global_batch"] == world * micro * accum == trainer.global_batch
    assert (trainer.cfg.data.batch_size, trainer.cfg.deepspeed.grad_accum) == (micro, accum)


def test_too_few_workers_for_too_long_ends_the_run_with_one_line(tmp_path, monkeypatch):
    """The controller callback raises once the run has waited past train.min_workers_timeout_s
    without a group; the driver's line names the workers, the last checkpoint and --resume."""
    from ray.train.v2._internal.execution.controller.state import RestartingState, RunningState
    from ray.train.v2.api.exceptions import ControllerError

    monkeypatch.setattr(elastic, "room_for", lambda resources: 1)
    monkeypatch.setattr(elastic, "fresh_reservations", lambda: None)
    clock = [100.0]
    monkeypatch.setattr(elastic.time, "monotonic", lambda: clock[0])
    watch = elastic.ElasticWatch(str(tmp_path), {"CPU": 1}, 2, wait_s=5, timeout_s=30)
    restarting = RestartingState(training_failed_error=RuntimeError("lost a node"))
    watch.after_controller_state_update(RunningState(), restarting)
    clock[0] += 29
    watch.after_controller_state_update(restarting, restarting)  # still in time
    watch.after_controller_state_update(restarting, RunningState())  # a group started: the wait starts over
    watch.after_controller_state_update(RunningState(), restarting)
    clock[0] += 31
    with pytest.raises(elastic.TooFewWorkers) as raised:
        watch.after_controller_state_update(restarting, restarting)

    os.makedirs(tmp_path / "checkpoint_000004")
    monkeypatch.setattr(recovery, "newest_complete", lambda run_dir: (str(tmp_path / "checkpoint_000004"), []))
    monkeypatch.setattr(recovery.storage, "checkpoint_step", lambda path: 4)
    recovery.record_attempt(str(tmp_path), {"start_step": 0, "world_size": 2})
    line = recovery.failure_summary(str(tmp_path), ControllerError(raised.value), 0)
    assert "\n" not in line
    assert line.startswith(f"run {tmp_path} stopped after 1 attempt(s) (2 worker(s) in its last attempt): ")
    assert "room for 1 training worker(s), fewer than the 2 the run needs (train.num_workers), for 31 s" in line
    assert "last complete checkpoint checkpoint_000004 (step 4)" in line and line.endswith("--resume")
