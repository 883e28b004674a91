"""The `raysl` command: bad input is one clear line on stderr and exit code 2."""

import os
import subprocess
import sys

import pytest


def raysl(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "raysl.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


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

RAY_COMMANDS = [
    ["demo"],
    ["pretrain", "quickstart", "optim.lr=0.01"],
    ["tune", "quickstart", "--space", "space.yaml"],
    ["eval", "knn", "--ckpt", "run", "--train", "a", "--val", "b"],
    ["shards", "build", "imgs", "--out", "shards"],
    ["bench", "data", "--shards", "shards"],
    ["bench", "methods"],
    ["bench", "step"],
]


@pytest.mark.parametrize("argv", RAY_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_address_is_accepted_before_and_after_every_ray_subcommand(argv):
    from raysl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*argv, "--address", "auto"]).address == "auto"
    assert parser.parse_args(["--address", "10.0.0.1:6379", *argv]).address == "10.0.0.1:6379"
    assert parser.parse_args(argv).address is None  # then init_ray reads $RAY_ADDRESS


def test_readme_pretrain_line_reaches_pretrain_with_the_address(monkeypatch, capsys):
    import raysl.train.run
    from raysl.cli import main

    seen = {}

    def fake_pretrain(cfg, *, address=None, resume=False):
        seen.update(cfg=cfg, address=address, resume=resume)
        return {"run_dir": "x"}

    monkeypatch.setattr(raysl.train.run, "pretrain", fake_pretrain)
    argv = ["pretrain", "quickstart", "data.shards=s3://bucket/shards", "train.storage_path=s3://bucket/runs",
            "--address", "auto"]
    assert main(argv) == 0
    assert seen["address"] == "auto" and seen["resume"] is False
    assert seen["cfg"].train.storage_path == "s3://bucket/runs" and seen["cfg"].data.shards == "s3://bucket/shards"
    assert main(["pretrain", "quickstart", "--resume", "--address", "ray://head:10001"]) == 0
    assert seen["address"] == "ray://head:10001" and seen["resume"] is True
    assert main(["--address", "auto", "pretrain", "quickstart"]) == 0
    assert seen["address"] == "auto"
    assert main(["pretrain", "quickstart"]) == 0
    assert seen["address"] is None
    assert '"run_dir": "x"' in capsys.readouterr().out


def test_init_ray_uses_ray_address_when_no_address_is_given(monkeypatch):
    import ray

    from raysl.runtime import init_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert init_ray(None) == "Ray: joined cluster at 10.0.0.1:6379"
    assert init_ray("auto") == "Ray: joined cluster at auto"  # --address wins over $RAY_ADDRESS
    assert [c["address"] for c in calls] == ["10.0.0.1:6379", "auto"]


def test_a_run_that_gives_up_prints_its_summary_on_one_line_and_exits_1(monkeypatch, capsys):
    import raysl.train.run
    from raysl.cli import main
    from raysl.errors import RunFailed

    def failing_pretrain(cfg, *, address=None, resume=False):
        raise RunFailed("run runs/r failed after 2 attempt(s) (train.max_failures=1); last step reached 7; ...")

    monkeypatch.setattr(raysl.train.run, "pretrain", failing_pretrain)
    assert main(["pretrain", "quickstart"]) == 1
    err = capsys.readouterr().err
    assert err == "raysl: run runs/r failed after 2 attempt(s) (train.max_failures=1); last step reached 7; ...\n"
