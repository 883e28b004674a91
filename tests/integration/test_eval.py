"""`raysl eval knn|linear|fewshot|finetune` on Ray Train: real digits, tiny timm ResNet."""

import json
import os

import pytest
import torch

from raysl.cli import main
from raysl.eval.knn import extract_features
from raysl.eval.labeled import load_labeled
from raysl.eval.monitor import knn_metrics
from raysl.eval.run import evaluate
from raysl.eval.weights import load_backbone


def test_knn_cli_across_two_workers_matches_one_process(ray_local, eval_sets, capsys):
    run = str(eval_sets / "run")
    code = main(
        [
            "eval",
            "knn",
            "--ckpt",
            run,
            "--train",
            str(eval_sets / "train"),
            "--val",
            str(eval_sets / "val"),
            "--workers",
            "2",
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(os.path.join(run, "eval_knn.json")) as f:
        assert json.load(f) == printed
    assert printed["step"] == 7 and printed["train_images"] == 150 and printed["val_images"] == 50
    backbone, _, _ = load_backbone(run)
    (tx, ty), (vx, vy) = load_labeled(str(eval_sets / "train"), 32), load_labeled(str(eval_sets / "val"), 32)
    single = knn_metrics(extract_features(backbone, tx), ty, extract_features(backbone, vx), vy, [20, 200], 0.07)
    assert {k: printed[k] for k in single} == pytest.approx(single, abs=1e-9)
    assert 10.0 < printed["knn_top1_k20"] <= printed["knn_top5_k20"] <= 100.0


def test_linear_fewshot_and_finetune(ray_local, eval_sets):
    run, train, val = str(eval_sets / "run"), str(eval_sets / "train"), str(eval_sets / "val")
    linear = evaluate("linear", run, train, val, options={"lrs": [0.01, 0.1, 1.0], "epochs": 30}, workers=2)
    assert set(linear["sweep"]) == {"0.01", "0.1", "1.0"}
    assert linear["top1"] == max(linear["sweep"].values()) == linear["sweep"][str(linear["best_lr"])]
    assert linear["top1"] > 50.0  # 10 classes; even random-init conv features separate digits linearly
    assert linear["steps"] == 30 * 1  # 150 images, 2 workers: one batch of 75 each per epoch

    few = evaluate("fewshot", run, train, val, options={"shots": [1, 10], "draws": 3})
    assert set(few) >= {"1shot", "10shot"}
    assert len(few["1shot"]["runs"]) == 3 and few["1shot"]["std"] >= 0.0
    assert few["10shot"]["mean"] > few["1shot"]["mean"] > 10.0

    ft = evaluate(
        "finetune",
        run,
        train,
        val,
        workers=2,
        options={
            "epochs": 2,
            "lr": 1e-3,
            "layer_decay": 0.75,
            "drop_path": 0.1,
            "mixup": 0.8,
            "cutmix": 1.0,
            "smoothing": 0.1,
            "batch_size": 16,
        },
    )
    assert [h["epoch"] for h in ft["history"]] == [1, 2]
    assert ft["steps"] == 2 * (75 // 16)
    assert all(torch.isfinite(torch.tensor(h["loss"])) and 0.0 <= h["val_top1"] <= 100.0 for h in ft["history"])
    assert ft["top1"] == ft["history"][-1]["val_top1"]
    for kind in ("linear", "fewshot", "finetune"):
        assert os.path.exists(os.path.join(run, f"eval_{kind}.json"))
