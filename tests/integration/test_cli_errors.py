"""The `raysl` command in a fresh process: bad input is one clear line on stderr and exit code 2;
the command ends as a normal exit does, less Python's teardown."""

import subprocess
import sys

import pytest


def raysl(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "raysl.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def _error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("raysl: error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    return lines[0]


@pytest.fixture
def images(tmp_path):
    from imagefactory import good_files

    d = tmp_path / "imgs"
    d.mkdir()
    for name, data in list(good_files().items())[:2]:
        (d / name).write_bytes(data)
    return d


def test_missing_src(tmp_path):
    line = _error_line(raysl("shards", "build", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")))
    assert str(tmp_path / "nowhere") in line


def test_unwritable_out(tmp_path, images):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the output folder should go")
    line = _error_line(raysl("shards", "build", str(images), "--out", str(blocker / "out")))
    assert str(blocker) in line


def test_malformed_metadata_row_names_file_and_line(tmp_path, images):
    meta = tmp_path / "meta.csv"
    meta.write_text("path,license,label\n" + f"{images}/good.jpg,cc0-1.0,3\n" + f"{images}/good.png,cc0-1.0,three\n")
    line = _error_line(raysl("shards", "build", str(images), "--out", str(tmp_path / "out"), "--metadata", str(meta)))
    assert "meta.csv:3" in line


def test_pretrain_config_error_before_ray(tmp_path):
    line = _error_line(raysl("pretrain", "quickstart", "optim.lr=-1"))
    assert "optim.lr" in line
    line = _error_line(raysl("pretrain", "quickstart", "data.shards=" + str(tmp_path)))
    assert "manifest.json" in line


# --address: after the subcommand (as the README shows), before it, or from $RAY_ADDRESS.
# In-process through build_parser / main with the work function replaced: no Ray starts.


EXITS = """
import atexit, sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from raysl.cli import exit_now
atexit.register(lambda: print("exit handler ran", flush=True))
threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished", flush=True))).start()
ThreadPoolExecutor(1).submit(print, "pool ran").result()  # an idle pool, never shut down: told to end
print("unflushed", end="")
exit_now(3)
"""


def test_the_command_ends_as_a_normal_exit_does_less_the_teardown():
    # the quick exit keeps what a normal exit does: the code, threads finished (an idle pool's told to
    # end, not waited on forever), handlers run, output flushed
    out = subprocess.run([sys.executable, "-c", EXITS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3, out.stderr
    assert out.stdout.index("unflushed") < out.stdout.index("thread finished") < out.stdout.index("exit handler ran")
