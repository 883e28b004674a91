"""`raysl curate embed` killed from outside mid-job: the rerun resumes without redoing the
shards already embedded."""

import os
import signal
import subprocess
import sys
import time

from curatefactory import MODEL
from procs import wait_gone

from raysl.curate import embeddings
from raysl.curate.embed import PAUSE_ENV, plan_embed, run_embed


def test_killed_embed_job_resumes_without_redoing_done_shards(ray_local, photos, tmp_path):
    out = str(tmp_path / "emb")
    cmd = [sys.executable, "-m", "raysl.cli", "curate", "embed", "--shards", photos, "--model", MODEL, "--out", out]
    cmd += ["--image-size", "64", "--actors", "1"]
    env = dict(os.environ, **{PAUSE_ENV: "3"})  # the actor sleeps 3 s after each part: time to kill it
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    parts = lambda: sorted(f for f in os.listdir(out) if f.startswith("part-")) if os.path.isdir(out) else []  # noqa: E731
    while not parts() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
    proc.wait()
    assert not wait_gone([proc.pid])
    done = parts()
    assert 1 <= len(done) < 6
    stamps = {f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns) for f in done}
    result = run_embed(plan_embed(photos, MODEL, out, image_size=64), actors=1)
    assert result["shards_skipped_done"] == len(done) and result["shards_embedded"] == 6 - len(done)
    assert {
        f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns) for f in done
    } == stamps
    assert len(parts()) == 6 and embeddings.load(out)[2].shape[0] == 30
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
