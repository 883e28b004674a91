"""`raysl curate embed` and `raysl curate dedup` killed from outside mid-job: the rerun
resumes without redoing the parts already written."""

import os
import signal
import subprocess
import sys
import time

from curatefactory import MODEL
from procs import wait_gone

from raysl.curate import embeddings
from raysl.curate.embed import PAUSE_ENV, plan_embed, run_embed


def _kill_after_first_part(cmd: list[str], pause_env: str, parts) -> list[str]:
    """Start `cmd` with its workers pausing 3 s after each part (`pause_env`), SIGKILL it and
    the local Ray it started once `parts()` lists a part; the parts written by then."""
    env = dict(os.environ, **{pause_env: "3"})
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while not parts() and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not wait_gone([proc.pid])
    return parts()


def test_killed_embed_job_resumes_without_redoing_done_shards(ray_local, photos, tmp_path):
    out = str(tmp_path / "emb")
    cmd = [sys.executable, "-m", "raysl.cli", "curate", "embed", "--shards", photos, "--model", MODEL, "--out", out]
    cmd += ["--image-size", "64", "--actors", "1"]
    parts = lambda: sorted(f for f in os.listdir(out) if f.startswith("part-")) if os.path.isdir(out) else []  # noqa: E731
    done = _kill_after_first_part(cmd, PAUSE_ENV, parts)  # the actor sleeps 3 s after each part
    assert 1 <= len(done) < 6
    stamps = {f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns) for f in done}
    result = run_embed(plan_embed(photos, MODEL, out, image_size=64), actors=1)
    assert result["shards_skipped_done"] == len(done) and result["shards_embedded"] == 6 - len(done)
    assert {
        f: (os.stat(os.path.join(out, f)).st_ino, os.stat(os.path.join(out, f)).st_mtime_ns) for f in done
    } == stamps
    assert len(parts()) == 6 and embeddings.load(out)[2].shape[0] == 30
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_killed_dedup_resumes_from_its_finished_parts(ray_local, photos, tmp_path, capsys):
    """`raysl curate dedup` killed (with the local Ray it started) while its tasks write parts:
    the rerun with the same arguments reuses the k-means and every finished part, says so,
    and decides as a run that was never killed."""
    import pyarrow.parquet as pq

    from raysl.curate.parts import PAUSE_ENV
    from raysl.curate.steps import run_dedup

    emb = str(tmp_path / "emb")
    run_embed(plan_embed(photos, MODEL, emb, image_size=64), actors=1)
    reference = str(tmp_path / "reference")
    run_dedup(emb, reference, clusters=3, keep="first")
    out = str(tmp_path / "sel")
    cmd = [sys.executable, "-m", "raysl.cli", "curate", "dedup", "--emb", emb, "--out", out, "--clusters", "3"]
    cmd += ["--keep", "first"]
    assign = os.path.join(out, ".work", "assign")
    parts = lambda: sorted(f for f in os.listdir(assign) if f.endswith(".parquet")) if os.path.isdir(assign) else []  # noqa: E731
    done = _kill_after_first_part(cmd, PAUSE_ENV, parts)  # each task sleeps 3 s after its part
    assert 1 <= len(done) < 6 and not os.path.exists(os.path.join(out, "manifest.json"))
    capsys.readouterr()
    run_dedup(emb, out, clusters=3, keep="first")
    err = capsys.readouterr().err
    assert "k-means of an earlier run reused" in err
    assert f"curate dedup: assign: {len(done)} of 6 parts already done, reused" in err
    assert not os.path.exists(assign)  # the working parts go once the selection is complete
    got, want = (pq.read_table(os.path.join(d, "lineage.parquet")) for d in (out, reference))
    for column in ("key", "decision", "reason", "duplicate_of", "dedup_cluster"):
        assert got.column(column).to_pylist() == want.column(column).to_pylist()
