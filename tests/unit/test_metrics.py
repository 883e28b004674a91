"""Rank 0's metrics without Ray: the progress line, metrics.jsonl, TensorBoard events,
their trimming on resume, and the same files staged and synced to a file:// URI."""

import json
import os
import shutil

import pytest

from raysl.train import metrics as metrics_mod
from raysl.train import storage
from raysl.train.metrics import MetricsLog, read_metrics


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(metrics_mod.time, "perf_counter", c)
    return c


def _row(step, loss=None, epoch=0):
    return {
        "step": step,
        "epoch": epoch,
        "loss": 2.0 - step / 100 if loss is None else loss,
        "lr": 1e-3 * step,
        "weight_decay": 0.05,
        "images_per_s": 55.5,
        "skipped_corrupt": 0,
    }


def _scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(os.path.join(run_dir, "tensorboard"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_progress_line_has_every_field_and_a_sane_eta(tmp_path, clock, capsys):
    log = MetricsLog(str(tmp_path), total_steps=100)
    clock.now += 20.0  # 10 steps in 20 s: 2 s a step, 90 steps to go
    log.log({**_row(10, loss=1.23456, epoch=1), "lr": 3.5e-4, "images_per_s": 123.45}, show=True)
    line = capsys.readouterr().out.strip()
    assert line == "step 10/100 epoch 1 loss 1.2346 lr 3.50e-04 123.5 img/s eta 0:03:00"
    log.log(_row(11), show=False)  # logged, not printed
    assert capsys.readouterr().out == ""
    clock.now += 7200.0  # a slow stretch: 50 steps in 7220 s, 50 to go -> 7220 s
    log.log(_row(50), show=True)
    assert capsys.readouterr().out.strip().endswith("eta 2:00:20")
    log.log(_row(100), show=True)  # the last step: nothing left
    assert capsys.readouterr().out.strip().endswith("eta 0:00:00")
    log.close()


def test_eta_after_resume_counts_only_this_attempts_steps(tmp_path, clock, capsys):
    log = MetricsLog(str(tmp_path), total_steps=100, resume_step=60)
    clock.now += 10.0  # 5 steps (61..65) in 10 s, 35 to go
    log.log(_row(65), show=True)
    assert capsys.readouterr().out.strip().endswith("eta 0:01:10")
    log.close()


def test_metrics_jsonl_and_tensorboard_hold_every_logged_row(tmp_path, clock):
    log = MetricsLog(str(tmp_path), total_steps=5)
    rows = [_row(s) for s in range(1, 6)]
    for r in rows:
        log.log(r, show=False)
    log.close()
    assert read_metrics(str(tmp_path)) == rows
    assert [json.loads(l) for l in open(tmp_path / "metrics.jsonl")] == rows
    for tag in ("loss", "lr", "epoch", "images_per_s"):
        got = _scalars(str(tmp_path), tag)
        assert [s for s, _ in got] == [1, 2, 3, 4, 5]
        assert [v for _, v in got] == pytest.approx([r[tag] for r in rows], rel=1e-6)


def test_resume_drops_the_steps_after_the_checkpoint(tmp_path, clock):
    """A run killed at step 5 after a checkpoint at step 3 trains steps 4 and 5 again:
    metrics.jsonl and TensorBoard keep steps 1-3 of the first attempt and the new 4-5."""
    first = MetricsLog(str(tmp_path), total_steps=5)
    for s in range(1, 6):
        first.log(_row(s), show=False)
    first.close()
    again = MetricsLog(str(tmp_path), total_steps=5, resume_step=3)
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3]
    for s in (4, 5):
        again.log(_row(s, loss=9.0 + s), show=False)
    again.close()
    rows = read_metrics(str(tmp_path))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in rows] == [_row(s)["loss"] for s in (1, 2, 3)] + [13.0, 14.0]
    assert _scalars(str(tmp_path), "loss") == [(s, pytest.approx(_row(s)["loss"])) for s in (1, 2, 3)] + [
        (4, 13.0),
        (5, 14.0),
    ]


def test_run_files_on_a_uri_are_staged_locally_and_synced(tmp_path, clock, monkeypatch):
    """With a file:// run dir nothing is written to a local folder named `file:`; the
    files reach the URI at sync, and on resume metrics.jsonl is fetched back first."""
    monkeypatch.chdir(tmp_path)
    uri = f"file://{tmp_path}/bucket/runs/r"
    where = tmp_path / "bucket" / "runs" / "r"
    files = storage.RunFiles(uri)
    assert files.remote and not files.local.startswith(str(tmp_path))
    log = MetricsLog(files.local, total_steps=4)
    for s in (1, 2, 3):
        log.log(_row(s), show=False)
    log.tb.flush()
    assert set(files.sync()) >= {"metrics.jsonl"} and files.sync() == []  # only what changed is copied
    log.close()
    files.close()
    assert not os.path.exists(files.local)
    assert [r["step"] for r in read_metrics(str(where))] == [1, 2, 3]
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(where / "tensorboard"))

    again = storage.RunFiles(uri, fetch=("metrics.jsonl",))  # resume from the checkpoint at step 2
    log = MetricsLog(again.local, total_steps=4, resume_step=2)
    log.log(_row(3, loss=7.0), show=False)
    log.close()
    again.close()
    assert [(r["step"], r["loss"]) for r in read_metrics(str(where))] == [
        (1, _row(1)["loss"]),
        (2, _row(2)["loss"]),
        (3, 7.0),
    ]
    assert not any(p.name.startswith("file:") for p in tmp_path.rglob("*"))


def _fake_checkpoint(d, world=2, listings=True):
    """A checkpoint directory as raysl.train.checkpoint.save leaves it: files, each worker's listing, rank 0's state."""
    d.mkdir(parents=True)
    for rank in range(world):
        (d / "engine").mkdir(exist_ok=True)
        files = {f"engine/zero_pp_rank_{rank}_optim_states.pt": 300 + rank, f"worker_{rank}.pt": 50}
        for rel, size in files.items():
            (d / rel).write_bytes(b"x" * size)
        if listings:
            (d / storage.worker_listing(rank)).write_text(json.dumps({"step": 4, "files": files}))
    state = {"step": 4, "world_size": world, **({"format": 2} if listings else {})}
    (d / storage.RUN_STATE).write_text(json.dumps(state))


def test_checkpoint_dirs_tell_complete_from_half_written(tmp_path):
    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_000000")
    (run / "checkpoint_000001").mkdir()
    expected = [("checkpoint_000000", True), ("checkpoint_000001", False)]
    assert storage.checkpoint_dirs(str(run)) == expected
    assert storage.checkpoint_dirs(f"file://{run}") == expected
    assert storage.checkpoint_dirs(str(tmp_path / "none")) == []


@pytest.mark.parametrize("uri", [False, True])
def test_a_checkpoint_with_a_missing_or_short_worker_file_is_named_and_skipped(tmp_path, uri):
    from raysl.train import recovery

    run = tmp_path / "run"
    old, new = run / "checkpoint_a", run / "checkpoint_b"
    _fake_checkpoint(old)
    _fake_checkpoint(new)
    where = f"file://{run}" if uri else str(run)
    assert storage.checkpoint_problem(f"{where}/checkpoint_b") is None
    assert recovery.newest_complete(where) == (f"{where}/checkpoint_b", [])
    with open(new / "engine" / "zero_pp_rank_1_optim_states.pt", "r+b") as f:
        f.truncate(7)  # killed mid-upload
    problem = "engine/zero_pp_rank_1_optim_states.pt is truncated (7 of 301 bytes)"
    assert storage.checkpoint_problem(f"{where}/checkpoint_b") == problem
    assert recovery.newest_complete(where) == (f"{where}/checkpoint_a", [("checkpoint_b", problem)])
    assert (
        recovery.skipped_line("checkpoint_b", problem)
        == f"raysl: warning: skipping damaged checkpoint checkpoint_b: {problem}"
    )
    for damage, expected in (
        (lambda: (old / "worker_0.pt").unlink(), "worker_0.pt is missing"),
        (
            lambda: (old / storage.worker_listing(1)).unlink(),
            "worker_1.json is missing (worker 1 had not finished uploading)",
        ),
        (lambda: (old / storage.worker_listing(1)).write_text('{"files": '), "worker_1.json is damaged"),
        (lambda: (old / storage.RUN_STATE).write_text("{"), f"{storage.RUN_STATE} is damaged"),
        (lambda: (old / storage.RUN_STATE).unlink(), f"no {storage.RUN_STATE} (rank 0 had not finished writing it)"),
    ):
        shutil.rmtree(old)
        _fake_checkpoint(old)
        damage()
        assert storage.checkpoint_problem(f"{where}/checkpoint_a") == expected
    path, skipped = recovery.newest_complete(where)
    assert path is None and [name for name, _ in skipped] == ["checkpoint_b", "checkpoint_a"]


def test_checkpoints_written_before_worker_listings_still_count_when_every_worker_file_is_there(tmp_path):
    _fake_checkpoint(tmp_path / "old", listings=False)
    assert storage.checkpoint_problem(str(tmp_path / "old")) is None
    (tmp_path / "old" / "worker_1.pt").unlink()
    assert storage.checkpoint_problem(str(tmp_path / "old")) == "worker_1.pt is missing"


def test_pretrain_checks_a_uri_runs_checkpoints_before_ray(tmp_path, monkeypatch):
    from raysl import pretrain as run
    from raysl.config import from_dict
    from raysl.errors import UserError

    monkeypatch.setattr(run, "validate", lambda cfg: None)  # no shard set needed for these checks
    monkeypatch.setattr("raysl.runtime.init_ray", lambda *a, **k: pytest.fail("Ray must not start"))
    cfg = from_dict({"train": {"storage_path": f"file://{tmp_path}/runs", "name": "r"}})
    (tmp_path / "runs" / "r" / "checkpoint_000000").mkdir(parents=True)  # half-written: no raysl_state.json
    with pytest.raises(UserError, match="already has checkpoints"):
        run.pretrain(cfg)
    with pytest.raises(UserError, match="no complete checkpoint"):
        run.pretrain(cfg, resume=True)


def test_the_give_up_line_names_attempts_last_step_checkpoint_and_a_lost_node(tmp_path):
    from raysl.train import recovery

    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_a")  # step 4
    log = MetricsLog(str(run), total_steps=10)
    for s in range(1, 7):
        log.log(_row(s), show=False)
    log.close()
    for start in (0, 4):
        recovery.record_attempt(str(run), {"start_step": start, "checkpoint": None, "source": None})
    error = RuntimeError(
        "Training failed due to worker errors:\n[Rank 1 Error Snippet]:\nray.exceptions.ActorDiedError: "
        "The actor died because its node has died. Node Id: 4f2c, IP: 10.0.0.7\n\ttraceback tail"
    )
    line = recovery.failure_summary(str(run), error, max_failures=1)
    assert "\n" not in line
    assert line == (
        f"run {run} failed after 2 attempt(s) (train.max_failures=1); last step reached 6; last complete "
        "checkpoint checkpoint_a (step 4); cause: ray.exceptions.ActorDiedError: The actor died because its "
        "node has died. Node Id: 4f2c, IP: 10.0.0.7. Continue it with the same command and --resume"
    )
    assert "cause: boom." in recovery.failure_summary(str(run), RuntimeError("x\nboom"), max_failures=-1)
    assert "(train.max_failures=unlimited)" in recovery.failure_summary(str(run), RuntimeError("x"), max_failures=-1)


def test_each_attempt_is_numbered_and_its_start_line_says_where_it_began(tmp_path):
    from raysl.train import recovery

    first = recovery.record_attempt(str(tmp_path), {"start_step": 0, "checkpoint": None, "source": None})
    again = recovery.record_attempt(
        str(tmp_path), {"start_step": 8, "checkpoint": "checkpoint_b", "source": "run storage"}
    )
    assert [a["attempt"] for a in recovery.read_attempts(str(tmp_path))] == [1, 2] and again["attempt"] == 2
    assert (
        recovery.start_line(first, "simclr on r, 2 worker(s)")
        == "raysl: attempt 1: simclr on r, 2 worker(s), starting at step 0"
    )
    assert recovery.start_line(again, "simclr on r, 2 worker(s)") == (
        "raysl: attempt 2: simclr on r, 2 worker(s), starting at step 8 from checkpoint_b "
        "(found in the run's storage); "
        "first step trained: 9"
    )


def test_eval_needs_only_rank_0s_weights_of_a_checkpoint(tmp_path):
    """A run copied without its optimizer state still evaluates; a cut-short weights file does not."""
    d = tmp_path / "checkpoint_a"
    _fake_checkpoint(d)
    (d / "weights.safetensors").write_bytes(b"w" * 80)
    listing = json.loads((d / storage.worker_listing(0)).read_text())
    listing["files"]["weights.safetensors"] = 80
    (d / storage.worker_listing(0)).write_text(json.dumps(listing))
    shutil.rmtree(d / "engine")
    only = ("weights.safetensors",)
    assert storage.checkpoint_problem(str(d)).endswith("is missing")  # not resumable
    assert storage.checkpoint_problem(str(d), only=only) is None  # but its weights are whole
    (d / "weights.safetensors").write_bytes(b"w" * 20)
    assert storage.checkpoint_problem(str(d), only=only) == "weights.safetensors is truncated (20 of 80 bytes)"
    (d / "weights.safetensors").unlink()
    assert storage.checkpoint_problem(str(d), only=only) == "weights.safetensors is missing"


def test_an_attempt_never_starts_from_a_checkpoint_judged_damaged_even_one_ray_train_registered(tmp_path):
    from raysl.train import recovery

    run = tmp_path / "run"
    _fake_checkpoint(run / "checkpoint_a")
    _fake_checkpoint(run / "checkpoint_b")
    registered = str(run / "checkpoint_b")
    assert recovery.choose_start(str(run), registered, None) == {
        "checkpoint": registered,
        "source": "ray train",
        "skipped": [],
    }
    assert recovery.choose_start(str(run), str(run / "checkpoint_a"), None)["source"] == "run storage"
    for name in ("checkpoint_a", "checkpoint_b"):
        (run / name / "worker_1.pt").unlink()
    start = recovery.choose_start(str(run), registered, "/elsewhere/checkpoint_x")
    assert start["checkpoint"] == "/elsewhere/checkpoint_x" and start["source"] == "handed over"
    assert [name for name, _ in start["skipped"]] == ["checkpoint_b", "checkpoint_a"]
    assert recovery.choose_start(str(run), registered, None)["checkpoint"] is None
