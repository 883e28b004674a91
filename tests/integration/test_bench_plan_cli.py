"""`raysl bench plan` in a fresh process: one JSON line with both formats."""

import json
import os
import subprocess
import sys

from raysl.bench.plan import simulated_manifest
from raysl.data import reader

FIGURES = {"manifest_bytes", "write_s", "read_s", "plan_s"}


def test_cli_prints_one_json_line_with_both_formats():
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "raysl.cli",
            "bench",
            "plan",
            "--shards",
            "40",
            "--workers",
            "3",
            "--epochs",
            "4",
            "--rows",
            "20",
            "--batch-size",
            "5",
            "--baseline-epochs",
            "4",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert (out["shards"], out["workers"], out["epochs"]) == (40, 3, 4)
    assert FIGURES | {"json_bytes", "index_bytes"} <= set(out["index"])
    assert FIGURES | {"plan_s_per_epoch", "plan_epochs_measured"} <= set(out["baseline_v1"])
    assert out["index"]["manifest_bytes"] == out["index"]["json_bytes"] + out["index"]["index_bytes"] > 0
    assert out["baseline_v1"]["manifest_bytes"] > 0 and {"plan_speedup", "bytes_ratio"} <= set(out)
    m = simulated_manifest(40, 20)
    assert out["steps_per_epoch"] == [
        reader.steps_per_epoch(m, batch_size=5, seed=0, epoch=e, world_size=3) for e in range(4)
    ]
