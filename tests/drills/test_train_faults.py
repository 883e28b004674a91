"""The fault drill of a real run: Ray Train + DeepSpeed ZeRO-2 + AdamW8bit on 2 gloo workers,
rank 0 SIGKILLed and a worker SIGTERMed (a preemption notice) from outside by pid, then
`--resume`: every step's loss bit-exact against an uninterrupted run."""

import glob
import os
import shutil
import signal
import threading
import time

import pytest
import torch
from procs import wait_gone
from runfactory import train_config

from raysl.errors import RunFailed, UserError
from raysl.pretrain import pretrain
from raysl.train import checkpoint, recovery, storage
from raysl.train.metrics import read_metrics


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


class _Killer:
    """Kills a training worker from outside, by the pid Ray's actor table reports for it,
    once rank 0 has logged a given step in metrics.jsonl: the fault drill of a real run."""

    def __init__(self, run_dir: str, plan: list[tuple[int, int, int]]):
        self.run_dir, self.plan, self.killed = run_dir, list(plan), []  # (attempt, after step, signal)
        self.rank0_pids: list[int] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _worker_pid(self, attempt: dict, sig: int) -> int:
        """SIGKILL: rank 0 (its actor id is in attempts.jsonl); SIGTERM: the other worker."""
        from ray._private.state import actors

        rank0 = actors(attempt["rank0_actor_id"])
        assert rank0["State"] == "ALIVE" and rank0["Pid"] == attempt["rank0_pid"]
        if sig == signal.SIGKILL:
            return rank0["Pid"]
        others = [
            a["Pid"]
            for a in actors().values()
            if a["ActorClassName"] == "RayTrainWorker" and a["State"] == "ALIVE" and a["Pid"] != rank0["Pid"]
        ]
        assert len(others) == 1, others
        return others[0]

    def _watch(self):
        try:
            while self.plan and not self._stop.is_set():
                attempt_no, after, sig = self.plan[0]
                attempts = recovery.read_attempts(self.run_dir)
                steps = [r["step"] for r in read_metrics(self.run_dir)]
                if len(attempts) == attempt_no and steps and steps[-1] >= after:
                    pid = self._worker_pid(attempts[-1], sig)
                    os.kill(pid, sig)
                    if sig == signal.SIGKILL:
                        assert not wait_gone([pid])
                        # what rank 0 had logged when it died, and the newest complete checkpoint then
                        # (name and step: Ray Train's keep_checkpoints may delete it later)
                        newest, _ = recovery.newest_complete(self.run_dir)
                        self.killed.append(
                            (
                                attempt_no,
                                [r["step"] for r in read_metrics(self.run_dir)][-1],
                                (os.path.basename(newest), storage.checkpoint_step(newest)) if newest else None,
                            )
                        )
                    else:
                        self.killed.append((attempt_no, after, None))
                    self.plan.pop(0)
                time.sleep(0.01)
        except BaseException as exc:  # surfaced by the test, not lost in the thread
            self.error = exc


def _ckpt_step(run_dir, name):
    return storage.checkpoint_step(os.path.join(run_dir, name))


def test_killed_and_preempted_workers_resume_from_the_latest_checkpoint(ray_local, train_shards, tmp_path):
    storage_path = str(tmp_path / "runs")
    # 1. uninterrupted: 14 steps over 2 epochs (64 images / 2 workers / batch 4 = 8 steps an epoch),
    # checkpoints at 4, 8, 12, 14
    base = pretrain(train_config(train_shards, storage_path, "base"))
    ref = _losses(base["run_dir"])
    assert sorted(ref) == list(range(1, 15))
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    run = base["run_dir"]
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "lr.png", recovery.ATTEMPTS):
        assert os.path.exists(os.path.join(run, f)), f
    assert [(a["attempt"], a["start_step"], a["checkpoint"]) for a in recovery.read_attempts(run)] == [(1, 0, None)]
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    ckpts = [p for p in glob.glob(os.path.join(run, "checkpoint_*")) if os.path.isdir(p)]
    assert len(ckpts) == 2  # keep last K
    last = base["checkpoint"]
    assert storage.checkpoint_problem(last) is None
    names = {os.path.basename(p) for p in glob.glob(os.path.join(last, "**", "*"), recursive=True)}
    assert {"worker_0.json", "worker_1.json", checkpoint.RUN_STATE}.issubset(names)
    # every worker's ZeRO-2 optimizer shard (8-bit state) was saved, and loads with weights_only=True
    optim_files = glob.glob(os.path.join(last, checkpoint.ENGINE_TAG, "*optim_states.pt"))
    assert len(optim_files) == 2
    state = checkpoint.safe_load(optim_files[0])
    tensors = [t for t in _walk(state) if isinstance(t, torch.Tensor)]
    assert any(t.dtype == torch.uint8 for t in tensors), "8-bit optimizer state should be in the checkpoint"

    # 2. rank 0 SIGKILLed one step after the step-4 checkpoint (the window in which Ray Train
    # had not yet registered it), then three steps after the step-8 one
    cfg = train_config(train_shards, storage_path, "killed", "train.max_failures=2")
    with _Killer(os.path.join(storage_path, "killed"), [(1, 5, signal.SIGKILL), (2, 11, signal.SIGKILL)]) as killer:
        killed = pretrain(cfg)
    assert killer.error is None, killer.error
    attempts = recovery.read_attempts(killed["run_dir"])
    assert [(a["attempt"], a["start_step"], a["first_step"]) for a in attempts] == [(1, 0, 1), (2, 4, 5), (3, 8, 9)], (
        attempts,
        killer.killed,
    )
    for (attempt_no, died_after, newest), nxt in zip(killer.killed, attempts[1:]):
        assert (nxt["checkpoint"], nxt["start_step"]) == newest
        assert nxt["start_step"] < died_after < nxt["start_step"] + 4  # only steps after the checkpoint are redone
    assert _losses(killed["run_dir"]) == ref  # bit-exact, every step, each step once in metrics.jsonl
    assert [r["step"] for r in read_metrics(killed["run_dir"])] == list(range(1, 15))

    # 3. a preemption notice: SIGTERM to rank 1 after step 6; with no retries allowed the run
    # stops after a checkpoint of the step in flight, with a one-line summary
    cfg = train_config(train_shards, storage_path, "preempted")
    with _Killer(os.path.join(storage_path, "preempted"), [(1, 6, signal.SIGTERM)]) as killer:
        with pytest.raises(RunFailed) as failed:
            pretrain(cfg)
    assert killer.error is None, killer.error
    run = os.path.join(storage_path, "preempted")
    stopped_at = read_metrics(run)[-1]["step"]
    newest, _ = recovery.newest_complete(run)
    assert 6 <= stopped_at < 14 and _ckpt_step(run, newest) == stopped_at  # the step in flight was checkpointed
    summary = str(failed.value)
    assert "\n" not in summary and "failed after 1 attempt(s) (train.max_failures=0)" in summary
    assert (
        f"last step reached {stopped_at}; last complete checkpoint {os.path.basename(newest)} (step {stopped_at})"
        in summary
    )
    assert "--resume" in summary and "SIGTERM" in summary

    # 4. `--resume`, past a newer checkpoint whose worker file was cut short
    damaged = os.path.join(run, "checkpoint_2999-01-01_00-00-00.000000")
    shutil.copytree(newest, damaged)
    (rank1_optim,) = glob.glob(os.path.join(damaged, checkpoint.ENGINE_TAG, "zero_pp_rank_1_*optim_states.pt"))
    with open(rank1_optim, "r+b") as f:
        f.truncate(100)
    assert f"{os.path.basename(rank1_optim)} is truncated (100 of" in storage.checkpoint_problem(damaged)
    with pytest.raises(UserError, match="--resume"):
        pretrain(cfg)  # refuses to start over an existing run silently
    resumed = pretrain(cfg, resume=True)
    attempts = recovery.read_attempts(resumed["run_dir"])
    assert [(a["attempt"], a["start_step"]) for a in attempts] == [(1, 0), (2, stopped_at)]  # 0 steps redone
    assert attempts[1]["checkpoint"] == os.path.basename(newest) and attempts[1]["skipped"] == [
        os.path.basename(damaged)
    ]
    assert _losses(resumed["run_dir"]) == ref


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj
