"""`raysl shards migrate` in a fresh process."""

import os
import subprocess
import sys

import pytest
from shardfactory import digit_images, write_shards

from raysl.data import legacy
from raysl.data.schema import read_manifest
from raysl.data.shard_index import INDEX


@pytest.fixture
def shards(tmp_path):
    d = str(tmp_path / "shards")
    write_shards(d, digit_images(40), shard_size=7)  # 6 shards: 7,7,7,7,7,5
    return d


def _as_v1(d):
    """Turn a current set into the version 1 layout: the shard list inside manifest.json."""
    m = read_manifest(d)
    old = legacy.ManifestV1(
        shards=[{"file": s["file"], "rows": s["rows"]} for s in m.shards],
        written=m.written,
        skipped=m.skipped,
        licenses=m.licenses,
        sources=m.sources,
    )
    os.remove(os.path.join(d, INDEX))
    legacy.write_v1(d, old)
    return m


def test_cli_migrate(shards):
    _as_v1(shards)
    env = dict(os.environ)
    run = lambda: subprocess.run(
        [sys.executable, "-m", "raysl.cli", "shards", "migrate", shards],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    done = run()
    assert done.returncode == 0, done.stderr
    assert "6 shard(s), 40 images" in done.stdout
    assert read_manifest(shards).rows == 40
    again = run()
    assert again.returncode == 2 and "nothing to migrate" in again.stderr
