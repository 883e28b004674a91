"""Elastic runs (`train.num_workers: [1, 2]`) on a real local multi-node Ray cluster (token auth on)
whose training nodes come and go from outside the run (tests/elastic_run.py, in a process of its
own): a node joins (the run grows to 2 workers) and is then lost without notice (the same run
goes on with 1 from its latest checkpoint), a node gets a spot reclaim's drain notice and goes
(the run writes a checkpoint at once, loses no step and goes on with 1), and a run that cannot
get its min workers ends with one line. Each run is checked from its attempts.jsonl and the keys of
the images every worker trained on in every step."""

import json
import os
import secrets
import subprocess
import sys

import pytest
from elastic_run import GROW_STEPS, HERE, STEPS
from procs import FAST_NODE_DEATH

from raysl.train import checkpoint, recovery

EPOCH_IMAGES, GLOBAL_BATCH, CHECKPOINT_EVERY = 64, 8, 2


@pytest.fixture(scope="module")
def drills(tmp_path_factory, train_shards):
    """The four runs of tests/elastic_run.py on one cluster; their directory."""
    out = tmp_path_factory.mktemp("elastic")
    token = out / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0", **FAST_NODE_DEATH)
    cmd = [sys.executable, os.path.join(HERE, "elastic_run.py"), str(out), train_shards]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return out


def attempts(out, name: str) -> list[dict]:
    return recovery.read_attempts(str(out / "runs" / name))


def final_steps(out, name: str) -> dict[int, dict]:
    """step -> {"world", "epoch", "keys"} of the last attempt that trained it (the one the run kept)."""
    rows = [json.loads(line) for line in open(out / f"{name}.keys")]
    last_attempt = {r["step"]: r["attempt"] for r in rows}  # file order: later attempts come later
    steps: dict[int, dict] = {}
    for r in sorted(rows, key=lambda r: (r["step"], r["rank"])):
        if r["attempt"] == last_attempt[r["step"]]:
            step = steps.setdefault(r["step"], {"world": r["world"], "epoch": r["epoch"], "keys": []})
            step["keys"] += r["keys"]
    return steps


def trained_by(out, name: str) -> list[list[int]]:
    """The steps each attempt trained, in the order the attempts ran."""
    order: dict[str, list[int]] = {}
    for line in open(out / f"{name}.keys"):
        r = json.loads(line)
        if r["rank"] == 0:
            order.setdefault(r["attempt"], []).append(r["step"])
    return list(order.values())


def check_every_image_once(out, name: str, total: int = STEPS) -> dict[int, dict]:
    """Every step of the run trained once in the end, on the global batch, and every image of
    every epoch in exactly one step of it."""
    steps = final_steps(out, name)
    assert sorted(steps) == list(range(1, total + 1))
    assert all(len(s["keys"]) == GLOBAL_BATCH for s in steps.values())
    for epoch in range(total * GLOBAL_BATCH // EPOCH_IMAGES):
        keys = [k for s in steps.values() if s["epoch"] == epoch for k in s["keys"]]
        assert len(keys) == len(set(keys)) == EPOCH_IMAGES, f"epoch {epoch}: an image trained twice or not at all"
    return steps


def check_resumed_from_checkpoints(out, name: str) -> None:
    """Each later attempt starts at the step of the checkpoint it names, and the steps the attempt
    before trained again are only those after it."""
    run = attempts(out, name)
    done = trained_by(out, name)
    for before, after, steps in zip(run, run[1:], done):
        assert after["checkpoint"] is not None
        state = checkpoint.run_state(str(out / "runs" / name / after["checkpoint"]))
        assert state["step"] == after["start_step"] and after["first_step"] == after["start_step"] + 1
        assert after["start_step"] <= steps[-1]  # never ahead of what was trained


def test_a_run_grows_when_a_node_joins(drills):
    """One training node, then two: the run goes on with 2 workers from its latest checkpoint
    (then the node goes again: test_a_lost_node_shrinks_the_run)."""
    run = attempts(drills, "grow")
    assert [a["world_size"] for a in run] == [1, 2, 1]
    check_resumed_from_checkpoints(drills, "grow")
    events = json.loads((drills / "events.json").read_text())
    assert events["grow"]["error"] is None
    assert run[1]["start_step"] >= events["grow"]["step"]  # a checkpoint written after the node joined
    steps = check_every_image_once(drills, "grow", GROW_STEPS)
    assert {s["world"] for s in steps.values()} == {1, 2}


def test_a_spot_reclaim_loses_no_step(drills):
    """A drain notice (reason PREEMPTION) on one of two nodes, then the node goes: every worker
    writes a checkpoint at once and trains no further step, and the run goes on with 1 worker
    from that checkpoint: 0 completed steps lost."""
    run = attempts(drills, "reclaim")
    assert [a["world_size"] for a in run] == [2, 1]
    check_resumed_from_checkpoints(drills, "reclaim")
    events = json.loads((drills / "events.json").read_text())
    assert events["reclaim"]["error"] is None
    first, _ = trained_by(drills, "reclaim")
    # the run's only checkpoint before it (train.checkpoint_every=100) is the drain notice's
    assert run[1]["start_step"] == first[-1] == events["reclaim"]["checkpoint_step"] >= events["reclaim"]["step"]
    check_every_image_once(drills, "reclaim")


def test_a_lost_node_shrinks_the_run(drills):
    """One of two nodes (the grown run's) goes without notice: the run goes on with 1 worker from
    its latest checkpoint."""
    run = attempts(drills, "grow")[1:]  # the group of 2 workers, then the one after the loss
    assert [a["world_size"] for a in run] == [2, 1]
    check_resumed_from_checkpoints(drills, "grow")
    events = json.loads((drills / "events.json").read_text())
    assert events["hard_loss"]["error"] is None
    _, on_two, _ = trained_by(drills, "grow")
    assert len(on_two) >= 3 and on_two[-1] >= events["hard_loss"]["step"]  # lost while training
    assert run[1]["start_step"] % CHECKPOINT_EVERY == 0 and run[1]["start_step"] >= on_two[-1] - 2 * CHECKPOINT_EVERY
    check_every_image_once(drills, "grow", GROW_STEPS)


def test_a_run_without_room_for_its_min_workers_ends_with_one_line(drills):
    events = json.loads((drills / "events.json").read_text())
    line = events["too_few"]["error"]
    assert line.startswith("RunFailed: ") and "\n" not in line
    assert "room for 1 training worker(s), fewer than the 2" in line and "--resume" in line


def test_bench_elastic_figures(drills):
    """`raysl bench elastic`'s figures of the grow and the reclaim (raysl.bench.elastic.Run.cost)."""
    events = json.loads((drills / "events.json").read_text())
    reclaim, grow = events["reclaim"]["cost"], events["grow"]["cost"]
    assert reclaim["world_sizes"] == [2, 1] and grow["world_sizes"] == [1, 2]
    assert reclaim["steps_lost"] == 0 and grow["steps_lost"] >= 0
    assert reclaim["seconds_to_first_step"] > 0 and grow["seconds_to_first_step"] > 0
