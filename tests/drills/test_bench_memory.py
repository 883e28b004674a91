"""`raysl bench memory` on a tiny ViT: two gloo workers per configuration, each reporting
its peak and what it holds of the model."""

from __future__ import annotations

import pytest

from raysl.bench.memory import run_memory_bench, table


@pytest.mark.timeout(600)
def test_memory_bench_partitions_under_zero3_and_reports_both_ratios():
    lines: list[str] = []
    rows = run_memory_bench("test_vit", 32, 2, ["0:adamw", "3:adamw8bit"], steps=1, emit=lines.append)
    zero0, zero3 = rows
    assert "error" not in zero0 and "error" not in zero3
    assert zero0["params_per_worker"] == zero0["params"]
    # ZeRO-3 splits every partitioned parameter in two (small ones stay whole: persistence threshold)
    assert zero3["params_per_worker"] < 0.6 * zero3["params"]
    for r in rows:
        assert r["peak_mib"] > r["base_rss_mib"] > 100  # torch alone is hundreds of MiB
        assert len(r["per_worker_mib"]) == 2 and all(v > 0 for v in r["per_worker_mib"])
    assert zero0["ratio_vs_zero0_adamw"] == 1.0 and zero0["ratio_above_base"] == 1.0
    expect = (zero3["peak_mib"] - zero3["base_rss_mib"]) / (zero0["peak_mib"] - zero0["base_rss_mib"])
    assert zero3["ratio_above_base"] == pytest.approx(expect, abs=1e-3)
    assert lines[-1] == table(rows) and "above the interpreter" in lines[-1]
