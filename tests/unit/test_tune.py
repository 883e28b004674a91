"""`raysl tune`: SPACE.yaml validation, and real Ray Tune searches (ASHA; PBT's checkpoint
hand-off) over tiny pretraining runs on the local Ray."""

import csv
import glob
import importlib.util
import os

import pytest
import yaml
from shardfactory import digit_images, write_shards

from raysl.config import load_config
from raysl.errors import UserError
from raysl.train.metrics import read_metrics
from raysl.tune.search import resolve_metric, tune_recipe
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


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tune_shards"))
    write_shards(d, digit_images(32), shard_size=8)
    return d


def _tiny(shards, *extra):
    return load_config(
        "quickstart",
        [
            f"data.shards={shards}",
            "data.image_size=32",
            "data.batch_size=8",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "optim.name=adamw",
            "deepspeed.zero_stage=0",
            "optim.warmup_steps=0",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.log_every=1",
            *extra,
        ],
    )


@pytest.mark.ray
def test_asha_search_writes_results_and_a_loadable_best_recipe(ray_local, shards, tmp_path):
    space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "method.temperature": {"choice": [0.1, 0.5]}})
    cfg = _tiny(shards, "train.max_steps=3", "train.checkpoint_every=3", "train.name=tiny")
    result = tune_recipe(
        cfg,
        space,
        scheduler="asha",
        samples=2,
        metric="loss",
        name="asha",
        storage=str(tmp_path),
        grace_steps=2,
        max_concurrent=1,
    )
    print("\n" + result["table"])
    rows = list(csv.DictReader(open(result["results_csv"])))
    assert len(rows) == 2 and result["errors"] == 0
    for row in rows:
        assert 1e-4 <= float(row["optim.lr"]) <= 1e-2 and float(row["method.temperature"]) in (0.1, 0.5)
        # the loss Tune ranked on is the one the run logged at that step; every step was reported
        # (train.log_every=1), not only the checkpoint at step 3, so ASHA's rung at step 2 saw it
        attempt = os.path.join(str(tmp_path), "asha", "train", row["trial_id"], "attempt_0")
        logged = {r["step"]: r["loss"] for r in read_metrics(attempt)}
        assert float(row["loss"]) == pytest.approx(logged[int(row["step"])], rel=1e-12)
        assert int(row["last_step"]) >= 2
    losses = [float(r["loss"]) for r in rows]
    assert losses == sorted(losses)  # best first

    best = load_config(result["best_yaml"])  # what `raysl pretrain best.yaml` loads
    assert best.optim.lr == pytest.approx(float(rows[0]["optim.lr"]))
    assert best.method.temperature == float(rows[0]["method.temperature"])
    assert best.model.backbone == "test_resnet" and best.train.name == "tiny_best"

    with pytest.raises(UserError, match="exists: pass --resume"):
        tune_recipe(cfg, space, samples=2, name="asha", storage=str(tmp_path))
    # --resume on a finished experiment restores it and reports the same trials
    again = tune_recipe(cfg, space, samples=2, name="asha", storage=str(tmp_path), resume=True)
    assert sorted(r["trial_id"] for r in again["rows"]) == sorted(r["trial_id"] for r in rows)


def test_cli_tune_reports_bad_space_as_user_error(tmp_path, capsys):
    from raysl.cli import main

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"optim.lrr": {"loguniform": [1e-4, 1e-2]}}))
    assert main(["tune", "quickstart", "--space", str(space)]) == 2
    assert "config key optim.lrr is unknown" in capsys.readouterr().err


@pytest.mark.ray
def test_pbt_exploits_a_checkpoint_and_the_trial_resumes_from_it(ray_local, shards, tmp_path):
    """Synchronous PBT, 2 trials at once: at step 2 both pause, the worse clones the
    better's Tune checkpoint (the Train checkpoint handed over) with a perturbed lr, and
    both continue as new Train runs that start at step 3 from those checkpoints."""
    space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    cfg = _tiny(shards, "train.max_steps=3", "train.checkpoint_every=2", "train.name=tiny")
    result = tune_recipe(
        cfg, space, scheduler="pbt", samples=2, metric="loss", name="pbt", storage=str(tmp_path), max_concurrent=2
    )
    print("\n" + result["table"])
    exp = os.path.join(str(tmp_path), "pbt")
    assert result["errors"] == 0 and len(result["rows"]) == 2
    trials = {}
    for trial in (r["trial_id"] for r in result["rows"]):
        attempts = sorted(glob.glob(os.path.join(exp, "train", trial, "attempt_*")))
        assert len(attempts) == 2, attempts  # the first run, then the one PBT restarted from a checkpoint
        assert [r["step"] for r in read_metrics(attempts[0])][:2] == [1, 2]
        assert [r["step"] for r in read_metrics(attempts[1])] == [3]  # resumed at step 3, not started over
        start = open(os.path.join(attempts[1], "resume_from.txt")).read().strip()
        assert os.path.exists(os.path.join(start, "weights.safetensors")), start  # a Train checkpoint of attempt_0
        lrs = [load_config(os.path.join(a, "config.yaml")).optim.lr for a in attempts]
        trials[trial] = (start, lrs)
    # exactly one trial exploited: it starts from the other trial's checkpoint with a perturbed lr;
    # the other continues from its own checkpoint with its own lr
    exploited = [t for t, (start, lrs) in trials.items() if t not in start]
    assert len(exploited) == 1, trials
    target = exploited[0]
    other = next(t for t in trials if t != target)
    assert other in trials[target][0]
    assert trials[target][1][1] != pytest.approx(trials[target][1][0])
    assert trials[other][1][1] == pytest.approx(trials[other][1][0])
    # bit-exact hand-off: the exploited trial's first step on the cloned weights and data
    # position gives the very loss the cloned trial logged at that step (computed before
    # the update, so the perturbed lr does not enter), not the loss of its own weights
    losses = {
        t: {r["step"]: r["loss"] for r in read_metrics(os.path.join(exp, "train", t, "attempt_0"))} for t in trials
    }
    resumed_loss = read_metrics(os.path.join(exp, "train", target, "attempt_1"))[0]["loss"]
    assert resumed_loss == read_metrics(os.path.join(exp, "train", other, "attempt_1"))[0]["loss"]
    if 3 in losses[other]:  # the cloned trial's first run may have taken step 3 before PBT paused it
        assert resumed_loss == losses[other][3]
    assert load_config(result["best_yaml"]).optim.lr in [pytest.approx(float(r["optim.lr"])) for r in result["rows"]]
