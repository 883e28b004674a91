"""`raysl shards build --append` killed from outside mid-build: the set's previous version
is left untouched."""

import os
import signal
import subprocess
import sys
import time

from imagefactory import encode, photo, read_file, write_folder
from procs import wait_gone
from shardfactory import set_content

from raysl.data import build, reader
from raysl.data.schema import MANIFEST


def test_killed_append_leaves_the_previous_set(tmp_path, ray_local):
    out = str(tmp_path / "set")
    build.build_shards(
        [write_folder(tmp_path / "old", {f"{i}.png": encode(photo(200 + i), "PNG") for i in range(4)})], out
    )
    before_json, before_rows = read_file(os.path.join(out, MANIFEST)), set_content(out)
    many = write_folder(tmp_path / "many", {f"{i:03d}.png": encode(photo(32 + i), "PNG") for i in range(80)})
    address = ray_local.get_runtime_context().gcs_address
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysl.cli", "shards", "build", many, "--out", out, "--append"]
        + ["--shard-size", "1", "--address", address],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ),
    )
    staging = os.path.join(out, build.STAGING)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if os.path.isdir(staging) and len([f for f in os.listdir(staging) if f.endswith(".parquet")]) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the append finished before it could be killed mid-write"
    os.kill(proc.pid, signal.SIGKILL)  # the driver, mid-write: its Ray tasks die with it
    proc.wait(timeout=60)
    assert not wait_gone([proc.pid])
    assert os.listdir(staging)  # it did die mid-write
    # the previous set is intact: same manifest.json, same rows, readable through the reader
    assert read_file(os.path.join(out, MANIFEST)) == before_json
    assert set_content(out) == before_rows
    assert sorted(r["key"] for r in reader.read_rows(out).take_all()) == sorted(before_rows)
    # the next append cleans up and completes
    m = build.build_shards([many], out, shard_size=40, append=True)
    assert m.rows == 84 and m.index_version == 1 and not os.path.exists(staging)
