"""`raysl shards migrate` in a fresh process."""

import os
import subprocess
import sys

from shardfactory import as_v1

from raysl.data.schema import read_manifest


def test_cli_migrate(small_shards):
    as_v1(small_shards)
    env = dict(os.environ)
    run = lambda: subprocess.run(
        [sys.executable, "-m", "raysl.cli", "shards", "migrate", small_shards],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    done = run()
    assert done.returncode == 0, done.stderr
    assert "6 shard(s), 40 images" in done.stdout
    assert read_manifest(small_shards).rows == 40
    again = run()
    assert again.returncode == 2 and "nothing to migrate" in again.stderr
