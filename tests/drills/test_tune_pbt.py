"""`raysl tune` with PBT over tiny pretraining runs on the local Ray: an exploit hands a
checkpoint to another trial, which resumes from it."""

import glob
import os

import pytest
from runfactory import tune_trial_config

from raysl.config import load_config
from raysl.train.metrics import read_metrics
from raysl.tune.search import tune_recipe
from raysl.tune.space import parse_space


def test_pbt_exploits_a_checkpoint_and_the_trial_resumes_from_it(ray_local, tune_shards, tmp_path):
    """Synchronous PBT, 2 trials at once: at step 2 both pause, the worse clones the
    better's Tune checkpoint (the Train checkpoint handed over) with a perturbed lr, and
    both continue as new Train runs that start at step 3 from those checkpoints."""
    space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}})
    cfg = tune_trial_config(tune_shards, "train.max_steps=3", "train.checkpoint_every=2", "train.name=tiny")
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
