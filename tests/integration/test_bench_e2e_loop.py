"""`raysl bench e2e`'s plain loop on a tiny size (no timed asserts): a DataLoader with a worker
process, and its wall time accounted for. The raysl side is `raysl pretrain`."""

import numpy as np
import pytest

from raysl.bench import e2e


def test_plain_loop_takes_the_steps_and_accounts_for_its_wall_time(tmp_path):
    d = e2e.write_digit_shards(str(tmp_path / "d"), 24, seed=0)
    cfg = e2e._config(d, str(tmp_path / "runs"), model="test_resnet", batch_size=8, steps=4, seed=0, name="p")
    out = e2e.run_plain(cfg, 4, workers=1)
    assert out["steps"] == 4 and np.isfinite(out["final_loss"])
    assert out["epochs"] == 2 and 0 <= out["epoch_turn_s"] <= out["data_wait_s"]  # 3 batches of 8 an epoch
    parts = out["startup_s"] + out["data_wait_s"] + out["compute_s"]
    assert abs(parts - out["wall_s"]) < 0.05
    assert abs(sum(out["shares"].values()) - 1) < 0.01


def test_plain_side_as_its_own_process_counts_its_imports_as_startup(tmp_path):
    d = e2e.write_digit_shards(str(tmp_path / "d"), 24, seed=0)
    cfg = e2e._config(d, str(tmp_path / "runs"), model="test_resnet", batch_size=8, steps=4, seed=0, name="p")
    recipe, log = str(tmp_path / "p.yaml"), str(tmp_path / "p.log")
    with open(recipe, "w") as f:
        f.write(cfg.to_yaml())
    out = e2e.run_plain_process(recipe, 4, log, nice=1)
    assert out["steps"] == 4 and np.isfinite(out["final_loss"]) and out["epochs"] == 2
    parts = out["startup_s"] + out["data_wait_s"] + out["compute_s"]
    assert abs(parts - out["wall_s"]) < 0.05
    # a fresh interpreter imports torch before its first step: that is startup, not compute
    assert out["startup_s"] > out["compute_s"]


def test_a_failing_side_names_its_log_and_shows_its_end(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with [1-9]\d*; the end of .*p\.log"):
        e2e.run_plain_process(str(tmp_path / "missing.yaml"), 4, str(tmp_path / "p.log"))
