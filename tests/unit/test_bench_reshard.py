"""`raysl bench reshard` at a tiny size: one JSON line whose byte counts agree with the
files it wrote and with the layout raysl records. No timings are checked."""

import json
import os

from raysl import cli
from raysl.bench import reshard
from raysl.train.reshard import layout


def test_bench_reshard_prints_one_consistent_json_line(tmp_path, capsys):
    cli.main(["bench", "reshard", "--numel", "200000", "--new-workers", "1", "3", "--dir", str(tmp_path)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])

    assert (r["params"], r["old_workers"], r["new_workers"]) == (200000, 2, [1, 3])
    files = sorted(os.listdir(tmp_path / "engine"))  # --dir keeps the old workers' files
    assert files == [f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in range(2)]
    assert r["optimizer_bytes"] == sum(os.path.getsize(tmp_path / "engine" / f) for f in files)
    assert len(r["reshard_s"]) == len(r["reshard_cpu_s"]) == len(r["bytes_read_per_new_worker"]) == 2
    assert all(s > 0 for s in r["reshard_s"] + r["reshard_cpu_s"])
    # one new worker reads every old file; none reads more than all of them
    assert r["files_read_per_new_worker"][0] == 2
    assert r["bytes_read_per_new_worker"][0] == r["optimizer_bytes"]
    assert all(b <= r["optimizer_bytes"] for b in r["bytes_read_per_new_worker"])

    # the bytes raysl_state.json gains: the layout raysl.train.reshard records for these groups
    numels = reshard.groups_of(200000)
    engine = reshard._Engine(reshard._NewZero2(numels, 1))
    assert r["extra_state_bytes"] == len(json.dumps(layout(engine))) > 0

    projected = r["projected_vit_g"]
    assert "projected" in projected["basis"] and projected["params"] == reshard.VIT_G
    whole = r["optimizer_bytes"] / r["params"] * reshard.VIT_G
    for case in projected["cases"]:
        # a few old files each, never all of them: at 1,024 workers each new worker reads about 1/1,000 of the state
        assert 2 <= case["files_per_new_worker"] <= 8 < case["old_workers"]
        assert case["bytes_per_new_worker"] < whole / 100
        assert case["reshard_s"] > 0
    assert [(c["old_workers"], c["new_workers"]) for c in projected["cases"]] == [(1024, 512), (512, 1024)]
