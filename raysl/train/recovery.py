"""Where each attempt of a run starts, and the line the driver prints when a run gives up.

Why Ray Train alone loses progress: its controller registers a checkpoint only once it has
polled every worker's report, and it polls every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s).
A worker killed within that window after `ray.train.report` takes its queued report with
it, so the retried group got an older checkpoint, or none and started at step 0, although
the checkpoint was complete in storage. On a cluster the window also spans the upload.
So rank 0 takes the newest complete `checkpoint_*` in the run's storage (the rule
`--resume` and `raysl eval` follow), which is never older than Ray Train's, and every
attempt is recorded in `attempts.jsonl` in the run directory."""

from __future__ import annotations

import datetime
import json
import os

from raysl.train import storage

ATTEMPTS = "attempts.jsonl"


class TooFewWorkers(RuntimeError):
    """Raised on Ray Train's controller: the cluster had room for fewer than `minimum` workers for `waited_s`."""

    def __init__(self, room: int, minimum: int, waited_s: float):
        super().__init__(room, minimum, waited_s)
        self.room, self.minimum, self.waited_s = room, minimum, waited_s

    def __str__(self) -> str:
        return (
            f"the cluster had room for {self.room} training worker(s), fewer than the {self.minimum} the run needs "
            f"(train.num_workers), for {self.waited_s:.0f} s (train.min_workers_timeout_s)"
        )


def newest_complete(run_dir: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(the newest complete checkpoint of the run, or None; (name, problem) of each newer
    one that is not complete and was passed over)."""
    skipped: list[tuple[str, str]] = []
    for name in reversed(storage.subdirs(run_dir, "checkpoint_")):
        path = f"{run_dir.rstrip('/')}/{name}"
        problem = storage.checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append((name, problem))
    return None, skipped


def choose_start(run_dir: str, registered: str | None, handed: str | None) -> dict:
    """Rank 0, at the start of an attempt: the checkpoint to load and where it was found.
    `registered` is Ray Train's latest checkpoint path (it lives in `run_dir` too, so it only
    names the source: one that failed the check is skipped like any other), `handed` one
    given by raysl.tune (a PBT exploit, a restored trial) for a run with none of its own yet."""
    path, skipped = newest_complete(run_dir)
    if path:
        source = "ray train" if registered and os.path.basename(registered) == os.path.basename(path) else "run storage"
    elif handed:
        path, source = handed, "handed over"
    else:
        source = None
    return {"checkpoint": path, "source": source, "skipped": skipped}


def read_attempts(run_local: str) -> list[dict]:
    path = os.path.join(run_local, ATTEMPTS)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def record_attempt(run_local: str, record: dict) -> dict:
    """Append this attempt (numbered after the earlier ones) to attempts.jsonl; returns it."""
    record = {
        "attempt": len(read_attempts(run_local)) + 1,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **record,
    }
    with open(os.path.join(run_local, ATTEMPTS), "a") as f:
        f.write(json.dumps(record) + "\n")
    return record


def start_line(record: dict, what: str) -> str:
    """The progress line that opens an attempt."""
    head = f"raysl: attempt {record['attempt']}: {what}"
    if record["checkpoint"] is None:
        return f"{head}, starting at step {record['start_step']}"
    found = {
        "ray train": "handed over by Ray Train",
        "run storage": "found in the run's storage",
        "handed over": "handed over by raysl tune",
    }[record["source"]]
    return (
        f"{head}, starting at step {record['start_step']} from {record['checkpoint']} "
        f"({found}); first step trained: {record['start_step'] + 1}"
    )


def skipped_line(name: str, problem: str) -> str:
    return f"raysl: warning: skipping damaged checkpoint {name}: {problem}"


def failure_summary(run_dir: str, error: BaseException, max_failures: int) -> str:
    """One line for a run Ray Train gave up on: attempts, the last step reached, the last
    complete checkpoint, the cause, and how to continue."""
    from raysl.train.metrics import read_metrics

    files = storage.RunFiles(run_dir, fetch=("metrics.jsonl", ATTEMPTS))
    try:
        attempts, rows = read_attempts(files.local), read_metrics(files.local)
    finally:
        files.close()
    last, _ = newest_complete(run_dir)
    where = f"{os.path.basename(last)} (step {storage.checkpoint_step(last)})" if last else "none"
    too_few = getattr(error, "controller_failure", None)
    if isinstance(too_few, TooFewWorkers):
        had = f"{attempts[-1]['world_size']} worker(s) in its last attempt" if attempts else "no attempt"
        return (
            f"run {run_dir} stopped after {len(attempts)} attempt(s) ({had}): {too_few}; last step reached "
            f"{rows[-1]['step'] if rows else 0}; last complete checkpoint {where}. Continue it once the cluster "
            "has room, with the same command and --resume"
        )
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # a lost node: Ray's line that names it ("... its node has died. Node ID: ..., IP: ...")
    cause = next(
        (line for line in lines if "node" in line.lower() and ("died" in line or "dead" in line)),
        lines[-1] if lines else type(error).__name__,
    )
    allowed = "unlimited" if max_failures < 0 else max_failures
    return (
        f"run {run_dir} failed after {len(attempts)} attempt(s) (train.max_failures={allowed}); "
        f"last step reached {rows[-1]['step'] if rows else 0}; last complete checkpoint {where}; "
        f"cause: {cause}. Continue it with the same command and --resume"
    )
