"""`raysl tune` checks without Ray: SPACE.yaml validation, metric and search checks, a new
attempt per trial restart."""

import importlib.util

import pytest
import yaml

from raysl.config import load_config
from raysl.errors import UserError
from raysl.tune.search import resolve_metric
from raysl.tune.space import load_space, parse_space


def test_space_parses_the_four_distributions():
    params = parse_space(
        {
            "optim.lr": {"loguniform": [1e-4, 1e-2]},
            "optim.weight_decay": {"uniform": [0.0, 0.1]},
            "method.temperature": {"choice": [0.1, 0.2]},
            "data.batch_size": {"randint": [4, 9]},
        }
    )
    assert [(p.key, p.kind, p.args) for p in params] == [
        ("optim.lr", "loguniform", (1e-4, 1e-2)),
        ("optim.weight_decay", "uniform", (0.0, 0.1)),
        ("method.temperature", "choice", (0.1, 0.2)),
        ("data.batch_size", "randint", (4, 9)),
    ]
    from ray import tune

    assert isinstance(params[0].tune_domain(), tune.search.sample.Float)
    assert isinstance(params[3].tune_domain(), tune.search.sample.Integer)


@pytest.mark.parametrize(
    "space, message",
    [
        ({"optim.learning_rate": {"uniform": [0.1, 0.2]}}, "config key optim.learning_rate is unknown"),
        ({"optimizer.lr": {"uniform": [0.1, 0.2]}}, "unknown section 'optimizer'"),
        ({"lr": {"uniform": [0.1, 0.2]}}, "must be section.key"),
        ({"optim.lr": {"normal": [0.1, 0.2]}}, "optim.lr: expected one of"),
        ({"optim.lr": {"loguniform": [0.0, 0.2]}}, "loguniform needs low > 0"),
        ({"optim.lr": {"uniform": [0.2, 0.1]}}, "needs low < high"),
        ({"optim.momentum": {"uniform": [0.5, 1.5]}}, r"optim.momentum: 1.5 is out of range"),
        ({"optim.name": {"choice": ["adamw", "adam"]}}, "'adam' is not one of"),
        ({"data.batch_size": {"loguniform": [4, 64]}}, "integer key: use randint or choice"),
        ({"data.batch_size": {"randint": [0, 8]}}, "data.batch_size: 0 is out of range"),
        ({}, "expected a mapping"),
        ({"method.queue_size": {"randint": [8, 16]}}, "method.queue_size is unknown to method simclr"),
    ],
)
def test_space_errors_name_the_key(space, message):
    with pytest.raises(UserError, match=message):
        parse_space(space, origin="SPACE.yaml")


def test_space_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_space(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim.lr: {uniform: [1, \n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_space(str(bad))


@pytest.mark.parametrize("uri", [False, True])
def test_each_restart_of_a_trial_trains_in_a_new_attempt(tmp_path, uri):
    """A PBT exploit or --resume starts a new Train run beside the earlier ones, on local
    storage and on a bucket URI alike (file:// here), never over an earlier attempt."""
    from raysl.tune.search import next_attempt

    trial = tmp_path / "train" / "trial_0"
    base = f"file://{trial}" if uri else str(trial)
    assert next_attempt(base) == "attempt_0"  # the trial's folder is not there yet
    (trial / "attempt_0").mkdir(parents=True)
    (trial / "attempt_1").mkdir()
    (trial / "resume_from.txt").write_text("x")  # a file, not an attempt
    assert next_attempt(base) == "attempt_2"


def test_metric_and_search_checks(tmp_path):
    cfg = load_config("quickstart")
    assert resolve_metric(cfg, "loss", None) == ("loss", "min")
    with pytest.raises(UserError, match="--metric val_loss: the held-out loss is off; set eval.val_shards"):
        resolve_metric(cfg, "val_loss", None)
    held_out = load_config("quickstart", ["eval.val_shards=/somewhere"])
    assert resolve_metric(held_out, "val_loss", None) == ("val_loss", "min")
    with pytest.raises(UserError, match="--metric val_acc: not a metric the training loop reports"):
        resolve_metric(cfg, "val_acc", None)
    with pytest.raises(UserError, match="eval.knn_shards"):
        resolve_metric(cfg, "knn_top1", None)
    knn = load_config("quickstart", ["eval.knn_shards=/somewhere"])
    assert resolve_metric(knn, "knn_top1", None) == ("knn_top1", "max")
    if importlib.util.find_spec("optuna") is None:
        from raysl.tune.search import search_alg

        with pytest.raises(UserError, match="needs the optuna package"):
            search_alg("optuna", "asha", 1)


def test_cli_tune_reports_bad_space_as_user_error(tmp_path, capsys):
    from raysl.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}))
    assert main(["tune", "quickstart", "--space", str(space)]) == 2
    assert "config key optim.lrr is unknown" in capsys.readouterr().err
