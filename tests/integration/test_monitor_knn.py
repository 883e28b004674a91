"""Online kNN monitor: a 2-worker pretraining run logs kNN top-1/top-5 at k=20 and k=200,
and the cross-worker numbers equal a single-process kNN of the checkpoint's backbone."""

import pytest
from runfactory import monitor_config

from raysl.eval.monitor import KnnMonitor, knn_metrics
from raysl.eval.weights import load_backbone
from raysl.pretrain import pretrain
from raysl.train.metrics import read_metrics


@pytest.mark.parametrize("zero", [2, 3])
def test_two_worker_monitor_matches_single_process_knn(ray_local, monitor_sets, zero):
    """Also under ZeRO-3: the method built partitioned, the monitor and val_loss
    on partitioned weights, weights.safetensors gathered for the single-process check."""
    held_out = [f"eval.val_shards={monitor_sets / 'knn'}", "eval.val_every=3", "eval.val_batches=2"]
    held_out += [f"deepspeed.zero_stage={zero}", f"train.name=monitored{zero}"]
    run = pretrain(monitor_config(monitor_sets, *held_out))["run_dir"]
    rows = {r["step"]: r for r in read_metrics(run)}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]
    for step, row in rows.items():  # the held-out SSL loss, on its own schedule
        assert ("val_loss" in row) == (step in (3, 6)), step
    assert all(0 < rows[s]["val_loss"] < 20 for s in (3, 6))
    keys = {"knn_top1", "knn_top1_k20", "knn_top5_k20", "knn_top1_k200", "knn_top5_k200"}
    for step, row in rows.items():
        assert keys.issubset(row) == (step in (3, 6)), step
    for step in (3, 6):
        r = rows[step]
        assert all(0.0 <= r[k] <= 100.0 for k in keys)
        assert r["knn_top1"] == r["knn_top1_k20"]
        assert r["knn_top5_k20"] >= r["knn_top1_k20"] and r["knn_top5_k200"] >= r["knn_top1_k200"]
        assert r["knn_top1_k20"] > 10.0  # 10 digit classes: better than chance even at random init

    # the same backbone (final checkpoint = weights at step 6) in one process, no torch.distributed
    cfg = monitor_config(monitor_sets)
    backbone, _, step = load_backbone(run)
    assert step == 6
    monitor = KnnMonitor(cfg, 32)
    assert len(monitor.bank) == 120 and len(monitor.query) == 30
    single = monitor.evaluate(backbone)
    assert single == pytest.approx({k: rows[6][k] for k in keys}, abs=1e-9)
    # k=200 is clipped to the 120 images of the memory bank
    from raysl.eval.monitor import gathered_features

    bank, query = gathered_features(backbone, monitor.bank), gathered_features(backbone, monitor.query)
    clipped = knn_metrics(bank, monitor.bank_labels, query, monitor.query_labels, [120], 0.07)
    assert clipped["knn_top1_k120"] == single["knn_top1_k200"]
