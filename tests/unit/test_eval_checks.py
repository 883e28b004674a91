"""`raysl eval`: bad input is refused before Ray starts, one clear error each."""

import json
import os

import pyarrow.parquet as pq
import pytest
import torch
import yaml
from shardfactory import digit_images, write_shards

from raysl.cli import main
from raysl.config import load_config
from raysl.errors import UserError
from raysl.eval.run import validate
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


def test_bad_input_is_refused_before_ray(sets, capsys):
    run, train, val = str(sets / "run"), str(sets / "train"), str(sets / "val")
    assert validate("knn", run, train, val) == (150, 50, 7)
    with pytest.raises(UserError, match=r"--ckpt .*run: that run trained 'test_resnet', not 'test_vit'"):
        validate("knn", run, train, val, backbone="test_vit")
    with pytest.raises(UserError, match=r"--ckpt .*edited: the weights do not fit a 'test_vit' backbone"):
        validate("linear", str(sets / "edited"), train, val)
    with pytest.raises(UserError, match=r"--train .*unlabeled: 8 of 8 rows have no value in the 'label' column"):
        validate("fewshot", run, str(sets / "unlabeled"), val)
    with pytest.raises(UserError, match=r"--val .*nolabelcol: shard .*shard-00000.parquet has no 'label' column"):
        validate("linear", run, train, str(sets / "nolabelcol"))
    with pytest.raises(UserError, match=r"--val .*empty: the shard set has no images"):
        validate("finetune", run, train, str(sets / "empty"))
    with pytest.raises(UserError, match=r"--shots 0: out of range \(must be >= 1\)"):
        validate("fewshot", run, train, val, options={"shots": [1, 0]})
    with pytest.raises(UserError, match=r"--ckpt .*train: no config.yaml there"):
        validate("knn", train, train, val)
    with pytest.raises(
        UserError, match=r"--ckpt s3://bucket/runs/x: eval, export and report read a run directory on this machine"
    ):
        validate("knn", "s3://bucket/runs/x", train, val)
    # the CLI prints one line and exits 2, before any Ray work
    assert main(["eval", "knn", "--ckpt", run, "--train", str(sets / "unlabeled"), "--val", val]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysl: error: --train ") and "'label' column" in err
    assert not os.path.exists(os.path.join(run, "eval_knn.json"))
