"""`raysl eval knn|linear|fewshot|finetune` on Ray Train: real digits, tiny timm ResNet."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from shardfactory import digit_images, write_shards

from raysl.cli import main
from raysl.config import load_config
from raysl.eval.knn import extract_features
from raysl.eval.labeled import load_labeled
from raysl.eval.monitor import knn_metrics
from raysl.eval.run import evaluate
from raysl.eval.weights import load_backbone
from raysl.methods.base import build_method
from raysl.train import checkpoint


def _write_run(run_dir, backbone: str, config_backbone: str | None = None) -> str:
    """A run directory as `raysl pretrain` leaves it (config.yaml + one checkpoint), at random init."""
    from safetensors.torch import save_file

    cfg = load_config(
        "quickstart",
        [f"model.backbone={backbone}", "data.image_size=32", "method.proj_hidden_dim=64", "method.proj_dim=32"],
    )
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in build_method(cfg).state_dict().items()}
    ckpt = os.path.join(run_dir, "checkpoint_000000")
    os.makedirs(ckpt)
    save_file(state, os.path.join(ckpt, checkpoint.WEIGHTS))
    with open(os.path.join(ckpt, checkpoint.RUN_STATE), "w") as f:
        json.dump({"step": 7}, f)
    raw = cfg.to_dict()
    raw["model"]["backbone"] = config_backbone or backbone
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(raw, f)
    return str(run_dir)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    digits = digit_images(200)
    write_shards(str(root / "train"), digits[:150], shard_size=50)
    write_shards(str(root / "val"), digits[150:], shard_size=25)
    write_shards(str(root / "unlabeled"), [(k, b, None) for k, b, _ in digits[:8]], shard_size=8)
    write_shards(str(root / "empty"), [], shard_size=8)
    write_shards(str(root / "nolabelcol"), digits[:8], shard_size=8)  # then drop the column, as other writers do
    shard = root / "nolabelcol" / "shard-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["label"]), shard)
    os.makedirs(root / "run")
    _write_run(root / "run", "test_resnet")
    os.makedirs(root / "edited")
    _write_run(root / "edited", "test_resnet", config_backbone="test_vit")
    return root


def test_knn_cli_across_two_workers_matches_one_process(ray_local, sets, capsys):
    run = str(sets / "run")
    code = main(
        ["eval", "knn", "--ckpt", run, "--train", str(sets / "train"), "--val", str(sets / "val"), "--workers", "2"]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with open(os.path.join(run, "eval_knn.json")) as f:
        assert json.load(f) == printed
    assert printed["step"] == 7 and printed["train_images"] == 150 and printed["val_images"] == 50
    backbone, _, _ = load_backbone(run)
    (tx, ty), (vx, vy) = load_labeled(str(sets / "train"), 32), load_labeled(str(sets / "val"), 32)
    single = knn_metrics(extract_features(backbone, tx), ty, extract_features(backbone, vx), vy, [20, 200], 0.07)
    assert {k: printed[k] for k in single} == pytest.approx(single, abs=1e-9)
    assert 10.0 < printed["knn_top1_k20"] <= printed["knn_top5_k20"] <= 100.0


def test_linear_fewshot_and_finetune(ray_local, sets):
    run, train, val = str(sets / "run"), str(sets / "train"), str(sets / "val")
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
