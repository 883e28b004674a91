"""`raysl tune` with ASHA over tiny pretraining runs on the local Ray: results and a loadable
best recipe."""

import csv
import os

import pytest
from runfactory import tune_trial_config

from raysl.config import load_config
from raysl.errors import UserError
from raysl.train.metrics import read_metrics
from raysl.tune.search import tune_recipe
from raysl.tune.space import parse_space


def test_asha_search_writes_results_and_a_loadable_best_recipe(ray_local, tune_shards, tmp_path):
    space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "method.temperature": {"choice": [0.1, 0.5]}})
    cfg = tune_trial_config(tune_shards, "train.max_steps=3", "train.checkpoint_every=3", "train.name=tiny")
    result = tune_recipe(
        cfg,
        space,
        scheduler="asha",
        samples=2,
        metric="loss",
        name="asha",
        storage=str(tmp_path),
        grace_steps=2,
        max_concurrent=2,
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
