"""Fault drills of runs whose checkpoints live on a bucket (moto's S3 server): a training
worker SIGKILLed by pid, and the network to the bucket cut while a checkpoint uploads."""

import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow.fs
from procs import wait_gone
from runfactory import train_config
from s3server import CutProxy

from raysl.pretrain import pretrain
from raysl.train import recovery, storage


def _attempts(run: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        if not storage.download(f"{run}/{recovery.ATTEMPTS}", os.path.join(d, recovery.ATTEMPTS)):
            return []
        return recovery.read_attempts(d)


def _steps(run: str) -> list[int]:
    with tempfile.TemporaryDirectory() as d:
        storage.download(f"{run}/metrics.jsonl", os.path.join(d, "m"))
        with open(os.path.join(d, "m")) as f:
            return [json.loads(line)["step"] for line in f if line.strip()]


def _newest_step(run: str) -> int:
    newest, _ = recovery.newest_complete(run)
    return storage.checkpoint_step(newest) if newest else 0


def _shards_on(s3, bucket: str, local: str) -> str:
    pyarrow.fs.copy_files(local, f"{bucket[len('s3://') :]}/shards", destination_filesystem=s3.filesystem())
    return f"{bucket}/shards"


def test_a_killed_worker_resumes_from_the_newest_complete_checkpoint_on_the_bucket(ray_local, s3, train_shards):
    from ray._private.state import actors

    bucket = s3.bucket()
    run = f"{bucket}/killed"
    killed: dict = {}

    def kill_rank0_after_step_4_checkpoint():
        # metrics and checkpoints reach the bucket at each checkpoint (every 2 steps): once the
        # step-4 one is complete there, rank 0 is training step 5 or later
        while not killed:
            attempts = _attempts(run)
            if attempts and _newest_step(run) >= 4:
                pid = attempts[0]["rank0_pid"]
                assert actors(attempts[0]["rank0_actor_id"])["Pid"] == pid
                os.kill(pid, signal.SIGKILL)
                assert not wait_gone([pid])
                killed.update(pid=pid, newest=_newest_step(run))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_rank0_after_step_4_checkpoint, daemon=True)
    killer.start()
    cfg = train_config(
        _shards_on(s3, bucket, train_shards), bucket, "killed", "train.max_failures=1", "train.checkpoint_every=2"
    )
    result = pretrain(cfg)
    killer.join(timeout=5)
    assert killed, "the run ended before rank 0 could be killed"
    attempts = _attempts(run)
    assert len(attempts) == 2, attempts
    second = attempts[1]
    # the newest checkpoint complete in the bucket when the new attempt started: never older
    # than the one complete when rank 0 died (a write in flight may have finished since)
    assert second["start_step"] >= killed["newest"] >= 4
    assert second["first_step"] == second["start_step"] + 1
    assert second["checkpoint"] and second["source"] in ("ray train", "run storage")
    assert second["rank0_pid"] != killed["pid"]
    assert result["steps"] == 14 and _steps(run) == list(range(1, 15))  # each step once in metrics.jsonl


def test_a_checkpoint_cut_off_mid_upload_is_never_resumed_from(s3, train_shards, tmp_path):
    bucket = s3.bucket()
    run = f"{bucket}/cut"
    proxy = CutProxy(s3.port)
    env = {**os.environ, "AWS_ENDPOINT_URL": proxy.endpoint}
    env.pop("RAY_ADDRESS", None)
    # resnet18: checkpoints of ~150 MB, long enough in flight to be cut
    overrides = [
        f"data.shards={train_shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "model.backbone=resnet18",
        "optim.name=adamw8bit",
        "deepspeed.zero_stage=2",
        "train.num_workers=2",
        "train.epochs=2",
        "train.max_steps=14",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=3",
        f"train.storage_path={bucket}",
        "train.name=cut",
    ]
    cmd = [sys.executable, "-m", "raysl.cli", "pretrain", "quickstart", *overrides]
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # watch the bucket (directly, not through the proxy) for the second checkpoint to appear
        deadline = time.monotonic() + 600
        while len(storage.subdirs(run, "checkpoint_")) < 2:
            assert first.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(0.02)
        proxy.cut()  # until the run ends
        cut_name = storage.subdirs(run, "checkpoint_")[-1]
        first.wait(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
        log.close()
    proxy.restore()
    first_pids = {a["rank0_pid"] for a in _attempts(run)}
    problem = storage.checkpoint_problem(f"{run}/{cut_name}")
    assert problem is not None, f"{cut_name} was complete: the cut came too late"
    previous = [n for n in storage.subdirs(run, "checkpoint_") if n < cut_name]
    assert previous and storage.checkpoint_problem(f"{run}/{previous[-1]}") is None
    previous_step = storage.checkpoint_step(f"{run}/{previous[-1]}")  # keep_checkpoints deletes it later
    # the bucket stayed out of reach until the run gave up: it could not finish
    assert first.returncode != 0 and storage.subdirs(run, "checkpoint_")[-1] == cut_name
    # two steps past the checkpoint it resumes from are enough to show where it went on
    resume = [*cmd, f"train.max_steps={previous_step + 2}", "--resume"]
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    proxy.close()
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    attempts = _attempts(run)
    assert attempts[-1]["checkpoint"] == previous[-1], attempts
    assert attempts[-1]["skipped"] == [cut_name]
    assert attempts[-1]["first_step"] == previous_step + 1
    warnings = [
        line for line in (resumed.stdout + resumed.stderr).splitlines() if "skipping damaged checkpoint" in line
    ]
    assert len(warnings) == 1 and warnings[0].endswith(recovery.skipped_line(cut_name, problem)), warnings
    # the first run's workers died with checkpoints not uploaded: the resumed run's workers on
    # this node deleted the local copies they left
    copies = [glob.glob(os.path.join(tempfile.gettempdir(), f"raysl_ckpt_pid{pid}_*")) for pid in first_pids]
    assert first_pids and not any(copies), copies
