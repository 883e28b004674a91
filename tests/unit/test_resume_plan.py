"""What a resumed attempt plans (Trainer.plan_run) from a checkpoint's state, without Ray: the
batching per worker, the steps left and the schedules' length, for the same worker count and
another one, under both train.on_resize settings."""

import pytest
import torch
from runfactory import train_config
from shardfactory import digit_images, write_shards

from raysl.data import mixture, plan
from raysl.train.build import make_schedules
from raysl.train.trainer import Trainer


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("shards"))
    write_shards(d, digit_images(64), shard_size=8)  # 8 shards; 2 workers x batch 4: 8 steps an epoch
    return d


def planned(cfg, world: int, saved: dict | None) -> Trainer:
    trainer = Trainer(cfg, "unused")
    trainer.world, trainer.rank = world, 0
    trainer.sets = mixture.from_config(cfg.data)
    trainer.plan_run(saved)
    return trainer


def after_steps(trainer: Trainer, steps: int) -> dict:
    """The state a checkpoint holds after `steps` steps of epoch 0 (no corrupt images)."""
    per_stream = trainer.state["per_stream"]
    consumed = [steps * per_stream] * trainer.state["streams"]
    images = steps * trainer.batching.global_batch
    return dict(trainer.state, step=steps, epoch_step=steps, consumed=consumed, images=images, workers=trainer.world)


def test_a_new_run_and_a_same_size_resume_plan_as_configured(shards, tmp_path):
    cfg = train_config(shards, str(tmp_path), "r", "train.max_steps=0")
    new = planned(cfg, 2, None)
    assert new.batching == plan.Batching(2, 4, 1) and new.steps == {0: 8, 1: 8} and new.total == 16
    assert new.schedule_steps == 16
    same = planned(cfg, 2, after_steps(new, 4))
    assert same.batching == new.batching and same.total == 16 and same.schedule_steps == 16
    assert same.cfg == new.cfg == cfg  # the engine's batch size and accumulation as configured


def test_keep_global_batch_accumulates_and_keeps_the_schedules(shards, tmp_path):
    cfg = train_config(shards, str(tmp_path), "r", "train.max_steps=0")
    base = planned(cfg, 2, None)
    one = planned(cfg, 1, after_steps(base, 4))
    assert one.batching == plan.Batching(1, 4, 2)
    assert (one.cfg.data.batch_size, one.cfg.deepspeed.grad_accum) == (4, 2)
    # the rest of epoch 0 on the 2 streams it started with, then epoch 1 planned on 1 worker
    assert one.steps == {0: 8, 1: 8} and one.total == 16 and one.schedule_steps == 16
    a, b = make_schedules(base.cfg, base.schedule_steps, 2), make_schedules(one.cfg, one.schedule_steps, 1)
    assert list(a.lr) == list(b.lr) and list(a.weight_decay) == list(b.weight_decay)


def test_keep_worker_batch_scales_the_lr_and_runs_the_schedules_on_images(shards, tmp_path):
    cfg = train_config(shards, str(tmp_path), "r", "train.max_steps=0", "train.on_resize=keep_worker_batch")
    base = planned(cfg, 2, None)
    one = planned(cfg, 1, after_steps(base, 4))
    assert one.batching == plan.Batching(1, 4, 1) and one.global_batch == 4
    # 32 images left of epoch 0 in steps of 4, then 64 in epoch 1: the run's 128 images, as planned
    assert one.steps == {0: 4 + 8, 1: 16} and one.total == 28
    assert one.schedule_steps == 128 // 8
    a, b = make_schedules(base.cfg, base.schedule_steps, 2), make_schedules(one.cfg, one.schedule_steps, 1)
    peak = cfg.optim.warmup_steps  # the linear rule scales the peak lr to the global batch (min_lr stays)
    assert len(b.lr) == len(a.lr) and b.lr[peak] == pytest.approx(a.lr[peak] / 2) and b.lr[-1] == a.lr[-1]
    assert list(b.weight_decay) == list(a.weight_decay)


def test_a_global_batch_that_does_not_split_is_the_nearest_smaller_one(shards, tmp_path, capsys):
    cfg = train_config(shards, str(tmp_path), "r", "train.max_steps=0", "train.num_workers=2")
    base = planned(cfg, 2, None)
    three = planned(cfg, 3, after_steps(base, 4))  # 8 images over 3 workers and 2 streams: 6
    assert three.batching == plan.Batching(3, 2, 1)
    assert "a global batch of 8 does not split over 3 worker(s)" in capsys.readouterr().out


def test_a_mixture_resumes_only_on_its_worker_count(tmp_path):
    from raysl.errors import UserError

    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_shards(a, digit_images(32), shard_size=8)
    write_shards(b, [(f"b/{k}", png, lab) for k, png, lab in digit_images(32)], shard_size=8)
    cfg = train_config(a, str(tmp_path), "r", f"data.shards=[{a}, {b}]", "data.weights=[0.5, 0.5]")
    base = planned(cfg, 2, None)
    with pytest.raises(UserError, match="train.num_workers=2 \\(this attempt has 1\\)"):
        planned(cfg, 1, after_steps(base, 1))


def test_every_step_of_every_worker_has_its_own_seed(monkeypatch):
    """Nothing random is checkpointed: each step reseeds torch (CPU and every GPU) from
    (train.seed, step, rank), so any attempt on any worker count draws the same."""
    from raysl.train.trainer import step_seed

    seeds = {step_seed(s, t, r) for s in (0, 1) for t in range(100) for r in range(8)}
    assert len(seeds) == 2 * 100 * 8 and step_seed(1, 5, 3) == step_seed(1, 5, 3)
    gpus: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", gpus.append)
    torch.manual_seed(step_seed(0, 7, 1))
    assert gpus == [step_seed(0, 7, 1)]
