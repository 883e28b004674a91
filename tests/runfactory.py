"""Run directories as `raysl pretrain` leaves them, and the labelled shard sets `raysl eval` reads."""

import json
import os

import pyarrow.parquet as pq
import torch
import yaml
from shardfactory import digit_images, write_shards

from raysl.config import load_config
from raysl.methods.base import build_method
from raysl.train import checkpoint


def write_run(run_dir, backbone: str, config_backbone: str | None = None) -> str:
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


def write_eval_sets(root):
    """Digit shards for `raysl eval` (train, val, unlabeled, empty, no label column) and two runs under `root`."""
    digits = digit_images(200)
    write_shards(str(root / "train"), digits[:150], shard_size=50)
    write_shards(str(root / "val"), digits[150:], shard_size=25)
    write_shards(str(root / "unlabeled"), [(k, b, None) for k, b, _ in digits[:8]], shard_size=8)
    write_shards(str(root / "empty"), [], shard_size=8)
    write_shards(str(root / "nolabelcol"), digits[:8], shard_size=8)  # then drop the column, as other writers do
    shard = root / "nolabelcol" / "shard-00000.parquet"
    pq.write_table(pq.read_table(shard).drop_columns(["label"]), shard)
    os.makedirs(root / "run")
    write_run(root / "run", "test_resnet")
    os.makedirs(root / "edited")
    write_run(root / "edited", "test_resnet", config_backbone="test_vit")
    return root
