"""The `raysl` command in-process with the work functions replaced: --address everywhere,
relative paths, a give-up summary on one line, quiet by default."""

import os
import subprocess
import sys

import pytest


def raysl(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "raysl.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


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
    ["bench", "checkpoint"],
    ["curate", "dedup", "--emb", "emb", "--out", "sel"],
    ["curate", "balance", "--emb", "emb", "--out", "sel", "--target", "10"],
]


@pytest.mark.parametrize("argv", RAY_COMMANDS, ids=lambda a: " ".join(a[:2]))
def test_address_is_accepted_before_and_after_every_ray_subcommand(argv):
    from raysl.cli import build_parser

    parser = build_parser()
    assert parser.parse_args([*argv, "--address", "auto"]).address == "auto"
    assert parser.parse_args(["--address", "10.0.0.1:6379", *argv]).address == "10.0.0.1:6379"
    assert parser.parse_args(argv).address is None  # then init_ray reads $RAY_ADDRESS


def test_readme_pretrain_line_reaches_pretrain_with_the_address(monkeypatch, capsys):
    import raysl.pretrain
    from raysl.cli import main

    seen = {}

    def fake_pretrain(cfg, *, address=None, resume=False):
        seen.update(cfg=cfg, address=address, resume=resume)
        return {"run_dir": "x"}

    monkeypatch.setattr(raysl.pretrain, "pretrain", fake_pretrain)
    argv = [
        "pretrain",
        "quickstart",
        "data.shards=s3://bucket/shards",
        "train.storage_path=s3://bucket/runs",
        "--address",
        "auto",
    ]
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
    import raysl.pretrain
    from raysl.cli import main
    from raysl.errors import RunFailed

    def failing_pretrain(cfg, *, address=None, resume=False):
        raise RunFailed("run runs/r failed after 2 attempt(s) (train.max_failures=1); last step reached 7; ...")

    monkeypatch.setattr(raysl.pretrain, "pretrain", failing_pretrain)
    assert main(["pretrain", "quickstart"]) == 1
    err = capsys.readouterr().err
    assert err == "raysl: run runs/r failed after 2 attempt(s) (train.max_failures=1); last step reached 7; ...\n"


def test_every_command_resolves_relative_paths_against_the_working_directory(tmp_path, monkeypatch, restore_environ):
    """Each command run from another working directory with relative paths hands the library
    absolute ones (a Ray worker resolves a relative path in its own session directory);
    URIs stay as given. The library entry points are replaced: no Ray starts."""
    import raysl.bench.data
    import raysl.bench.methods
    import raysl.data.build
    import raysl.data.inspect
    import raysl.demo
    import raysl.doctor
    import raysl.eval.export
    import raysl.eval.report
    import raysl.eval.run
    import raysl.pretrain
    import raysl.runtime
    import raysl.tune.search
    import raysl.tune.space
    from raysl.cli import main

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    (cwd / "recipe.yaml").write_text("data:\n  shards: shards\n")
    seen = {}

    def record(name, result=None):
        def fake(*args, **kwargs):
            seen[name] = (args, kwargs)
            return result

        return fake

    monkeypatch.setattr(raysl.runtime, "init_ray", record("init_ray", "Ray: faked"))
    monkeypatch.setattr(raysl.demo, "run_demo", record("demo"))
    monkeypatch.setattr(raysl.pretrain, "pretrain", record("pretrain", {}))
    monkeypatch.setattr(raysl.tune.space, "load_space", record("load_space", []))
    monkeypatch.setattr(
        raysl.tune.search,
        "tune_recipe",
        record(
            "tune",
            {"table": ""} | dict.fromkeys(("experiment_dir", "metric", "mode", "results_csv", "best_yaml", "errors")),
        ),
    )
    monkeypatch.setattr(raysl.eval.run, "evaluate", record("eval", {}))
    monkeypatch.setattr(raysl.eval.export, "export", record("export", {}))
    monkeypatch.setattr(raysl.eval.report, "build_report", record("report", ""))
    monkeypatch.setattr(raysl.data.build, "plan_build", record("plan_build"))
    monkeypatch.setattr(raysl.data.build, "run_build", record("run_build"))
    monkeypatch.setattr(raysl.data.build, "format_summary", record("format_summary", ""))
    monkeypatch.setattr(raysl.data.inspect, "inspect_shards", record("inspect"))
    monkeypatch.setattr(raysl.data.inspect, "format_inspect", record("format_inspect", ""))
    monkeypatch.setattr(raysl.data.inspect, "contact_sheet", record("contact_sheet", 0))
    monkeypatch.setattr(raysl.bench.data, "run_data_bench", record("bench_data", {}))
    monkeypatch.setattr(raysl.bench.methods, "run_from_args", record("bench_methods", {"table": ""}))
    monkeypatch.setattr(raysl.doctor, "run_checks", record("doctor", []))

    def here(rel):
        return str(cwd / rel)

    assert main(["demo", "--out", "out/demo"]) == 0
    assert seen["demo"][0] == (here("out/demo"),)
    assert main(["demo"]) == 0 and seen["demo"][0] == (here("demo_out"),)  # the default too

    assert (
        main(
            [
                "pretrain",
                "recipe.yaml",
                "eval.knn_shards=../labeled",
                "eval.knn_val_shards=q",
                "eval.val_shards=v",
                "train.storage_path=runs",
            ]
        )
        == 0
    )
    cfg = seen["pretrain"][0][0]
    assert (
        cfg.data.shards,
        cfg.eval.knn_shards,
        cfg.eval.knn_val_shards,
        cfg.eval.val_shards,
        cfg.train.storage_path,
    ) == (here("shards"), str(tmp_path / "labeled"), here("q"), here("v"), here("runs"))

    assert main(["tune", "recipe.yaml", "--space", "space.yaml", "--storage", "tune_runs"]) == 0
    assert seen["load_space"][0] == (here("space.yaml"), "simclr")
    assert seen["tune"][0][0].data.shards == here("shards") and seen["tune"][1]["storage"] == here("tune_runs")
    assert main(["tune", "recipe.yaml", "--space", "space.yaml", "--storage", "s3://bucket/tune"]) == 0
    assert seen["tune"][1]["storage"] == "s3://bucket/tune"

    assert main(["eval", "knn", "--ckpt", "runs/demo", "--train", "d/train", "--val", "d/val"]) == 0
    assert seen["eval"][0] == ("knn", here("runs/demo"), here("d/train"), here("d/val"))

    assert main(["export", "--ckpt", "runs/demo", "--out", "exported", "--shards", "moved"]) == 0
    assert seen["export"][0] == (here("runs/demo"), here("exported")) and seen["export"][1]["shards"] == here("moved")

    assert main(["report", "runs/demo", "--eval", "d/val"]) == 0
    assert seen["report"][0] == (here("runs/demo"), here("d/val"))

    assert (
        main(
            [
                "shards",
                "build",
                "photos",
                "more.tar",
                "s3://bucket/part.parquet",
                "--out",
                "shards",
                "--metadata",
                "meta.csv",
            ]
        )
        == 0
    )
    args, kwargs = seen["plan_build"]
    assert args == ([here("photos"), here("more.tar"), "s3://bucket/part.parquet"], here("shards"))
    assert kwargs["metadata"] == here("meta.csv")

    assert main(["shards", "inspect", "shards", "--grid", "sheet.png"]) == 0
    assert seen["inspect"][0] == (here("shards"),) and seen["contact_sheet"][0] == (here("shards"), here("sheet.png"))

    assert main(["bench", "data", "--shards", "shards"]) == 0
    assert seen["bench_data"][0][0] == here("shards")
    assert main(["bench", "methods", "--out", "bench"]) == 0
    assert seen["bench_methods"][0][0].out == here("bench")

    assert main(["doctor", "--storage", "runs"]) == 0
    assert seen["doctor"][0] == (None, here("runs"))


def test_quiet_by_default_verbose_on_request(monkeypatch, restore_environ):
    """Quiet: the driver's third-party loggers and Ray Data's env settings, and the same for
    every Ray worker of the job (runtime_env); --verbose leaves all of it alone. A local start
    also has Ray Train's controller poll its workers sooner (LOCAL_ENV); a cluster does not."""
    import logging

    import ray

    from raysl import runtime
    from raysl.cli import build_parser

    loggers = [logging.getLogger(name) for name in ("bitsandbytes", "DeepSpeed")]
    saved = [(lg.level, list(lg.filters)) for lg in loggers]
    for key in (runtime.VERBOSE_ENV, *runtime.QUIET_ENV, *runtime.LOCAL_ENV, *runtime.STORAGE_ENV):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    try:
        runtime.set_verbose(False)
        assert {k: os.environ[k] for k in runtime.QUIET_ENV} == runtime.QUIET_ENV
        assert logging.getLogger("bitsandbytes.backends.cpu.ops").getEffectiveLevel() == logging.ERROR
        deepspeed = logging.getLogger("DeepSpeed")
        deepspeed.setLevel(logging.WARNING)  # as DeepSpeed does when it is imported
        assert not all(f.filter(logging.makeLogRecord({"levelno": logging.WARNING})) for f in deepspeed.filters)
        runtime.init_ray()
        assert calls[-1]["runtime_env"] == {
            "env_vars": {**runtime.QUIET_ENV, **runtime.LOCAL_ENV},
            "worker_process_setup_hook": "raysl.runtime.setup_worker",
        }
        assert calls[-1]["logging_level"] == logging.WARNING
        runtime.init_ray("10.0.0.1:6379")  # a cluster's workers: Ray Train's own poll interval
        assert calls[-1]["runtime_env"]["env_vars"] == runtime.QUIET_ENV
        monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "3")  # the user's setting: not overridden
        runtime.init_ray()
        rest = {k: v for k, v in runtime.LOCAL_ENV.items() if k != "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"}
        assert calls[-1]["runtime_env"]["env_vars"] == {**runtime.QUIET_ENV, **rest}
        monkeypatch.delenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")

        runtime.set_verbose(True)
        runtime.init_ray()
        assert calls[-1]["runtime_env"] == {
            "env_vars": runtime.LOCAL_ENV,
            "worker_process_setup_hook": "raysl.runtime.setup_worker",  # the workers' RAY_ADDRESS
        }
        assert "logging_level" not in calls[-1]
        runtime.init_ray("10.0.0.1:6379")
        assert calls[-1]["runtime_env"] is None
        assert runtime.train_logging().log_level == "INFO"
    finally:
        for lg, (level, filters) in zip(loggers, saved):
            lg.setLevel(level)
            lg.filters[:] = filters
    assert build_parser().parse_args(["eval", "knn", "--ckpt", "r", "--train", "t", "--val", "v", "-v"]).verbose
    assert build_parser().parse_args(["--verbose", "shards", "inspect", "d"]).verbose
    assert not hasattr(build_parser().parse_args(["doctor"]), "verbose")
