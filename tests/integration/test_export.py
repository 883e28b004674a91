"""`raysl export`: a real run's backbone loads with timm.create_model, with a model card and
the training data's attributions; bad --ckpt input is one clear error each."""

import csv
import json
import os
import shutil

import pyarrow.parquet as pq
import pytest
import torch
import yaml

from raysl.cli import main
from raysl.data.schema import read_manifest, shard_paths
from raysl.data.views import IMAGENET_MEAN, IMAGENET_STD
from raysl.errors import UserError
from raysl.eval.export import export
from raysl.eval.knn import extract_features
from raysl.eval.weights import backbone_state, load_backbone, method_state

SIZE = 64  # the size the session's vit_run trains at (tests/integration/conftest.py); not test_vit's 160


def _digits_uint8(shards, n=12):
    from raysl.eval.pictures import sample_images

    return sample_images(shards, n, SIZE)


def test_export_loads_in_timm_with_the_checkpoint_weights(vit_run, tmp_path):
    import timm

    run, shards = vit_run
    out = tmp_path / "export"
    result = export(run, str(out))
    assert result["step"] == 3 and result["img_size"] == SIZE

    # exactly the call the model card documents
    model = timm.create_model(
        "test_vit",
        pretrained=True,
        num_classes=0,
        img_size=SIZE,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
    )
    _, _, state = method_state(run)
    ckpt = backbone_state(state)
    loaded = model.state_dict()
    assert set(loaded) == set(ckpt), set(loaded) ^ set(ckpt)  # no missing or unexpected keys
    for k, v in ckpt.items():
        assert torch.equal(loaded[k], v), k
    reference, _, _ = load_backbone(run)
    images = _digits_uint8(shards)
    f_export, f_ref = extract_features(model, images), extract_features(reference, images)
    torch.testing.assert_close(f_export, f_ref)
    assert f_export.std(0).mean() > 0  # real, varied features

    # timm's own local-dir route reads config.json (architecture, image size) by itself
    again = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert again.num_classes == 0 and again.patch_embed.img_size == (SIZE, SIZE)
    data_cfg = timm.data.resolve_data_config(model=again)
    assert tuple(data_cfg["input_size"]) == (3, SIZE, SIZE) and tuple(data_cfg["mean"]) == IMAGENET_MEAN
    torch.testing.assert_close(extract_features(again, images), f_ref)

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["num_classes"] == 0
    assert cfg["num_features"] == model.num_features
    pre = cfg["pretrained_cfg"]
    assert pre["input_size"] == [3, SIZE, SIZE]
    assert pre["mean"] == list(IMAGENET_MEAN) and pre["std"] == list(IMAGENET_STD)
    assert "license" not in pre and pre["tag"] == "raysl_simclr"


def test_model_card_and_attributions_trace_every_training_image(vit_run, tmp_path):
    run, shards = vit_run
    out = tmp_path / "export"
    assert main(["export", "--ckpt", run, "--out", str(out)]) == 0
    card = (out / "README.md").read_text()
    assert f"img_size={SIZE}" in card and str(out / "model.safetensors") in card
    assert "| images seen (steps x global batch) | 24 |" in card  # 3 steps x 8 images x 1 worker
    assert "| cc0-1.0 | 48 |" in card and f"`{shards}`" in card and "| duplicate | 0 |" in card
    assert "| loss |" in card
    recipe = card.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(recipe)["model"]["backbone"] == "test_vit"
    with open(out / "ATTRIBUTIONS.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    keys = [
        k
        for p in shard_paths(shards, read_manifest(shards))
        for k in pq.read_table(p, columns=["key"]).column("key").to_pylist()
    ]
    assert [r["key"] for r in rows] == keys and len(keys) == 48
    assert set(rows[0]) == {"key", "source", "license", "attribution"}
    assert {r["license"] for r in rows} == {"cc0-1.0"} and {r["source"] for r in rows} == {"test"}


def test_export_refuses_bad_runs_with_one_clear_error(vit_run, tmp_path, capsys):
    run, shards = vit_run
    # not a run at all
    assert main(["export", "--ckpt", str(tmp_path), "--out", str(tmp_path / "o1")]) == 2
    assert "no config.yaml there" in capsys.readouterr().err
    # a run with no checkpoint
    empty = tmp_path / "no_ckpt"
    empty.mkdir()
    shutil.copy(os.path.join(run, "config.yaml"), empty / "config.yaml")
    with pytest.raises(UserError, match="no complete checkpoint"):
        export(str(empty), str(tmp_path / "o2"))
    # weights of another backbone than config.yaml names
    edited = tmp_path / "edited"
    shutil.copytree(run, edited, ignore=shutil.ignore_patterns("engine", "*.pt", "tensorboard"))
    cfg = yaml.safe_load((edited / "config.yaml").read_text())
    cfg["model"]["backbone"] = "test_resnet"
    (edited / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="do not fit a 'test_resnet' backbone"):
        export(str(edited), str(tmp_path / "o3"))
    # the training shard set moved away: the card cannot list the data, so say how to fix it
    moved = tmp_path / "moved"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("engine", "*.pt", "tensorboard"))
    cfg = yaml.safe_load((moved / "config.yaml").read_text())
    cfg["data"]["shards"] = str(tmp_path / "gone")
    (moved / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(UserError, match="pass --shards DIR"):
        export(str(moved), str(tmp_path / "o4"))
    assert export(str(moved), str(tmp_path / "o4"), shards=shards)["images_seen"] == 24
