"""Pretraining runs for tests: the configs they start from, the run directories they leave, and the shard sets
`raysl eval` reads."""

import json
import os

import pyarrow.parquet as pq
import torch
import yaml
from shardfactory import digit_images, write_shards

from raysl.config import from_dict, load_config
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


def monitor_config(root, *extra):
    """A 2-worker, 6-step quickstart config on `root`'s digit shards, with the online kNN monitor every 3 steps."""
    return load_config(
        "quickstart",
        [
            f"data.shards={root / 'pretrain'}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "optim.name=adamw",
            "deepspeed.zero_stage=2",
            "train.num_workers=2",
            "train.max_steps=6",
            "train.checkpoint_every=6",
            "train.log_every=3",
            f"train.storage_path={root / 'runs'}",
            "train.name=monitored",
            f"eval.knn_shards={root / 'knn'}",
            "eval.knn_every=3",
            "eval.knn_k=[20, 200]",
            *extra,
        ],
    )


def train_config(shards, storage, name, *extra):
    """A 2-worker ZeRO-2 AdamW8bit quickstart config on digit shards: 14 steps, a checkpoint every 4 (2 kept)."""
    return load_config("quickstart", train_overrides(shards, storage, name, *extra))


def train_overrides(shards, storage, name, *extra) -> list[str]:
    """`train_config`'s overrides of the quickstart recipe, for tests that run the CLI (a later
    key in `extra` wins)."""
    return [
        f"data.shards={shards}",
        "data.image_size=32",
        "data.batch_size=4",
        "model.backbone=test_resnet",
        "method.proj_hidden_dim=64",
        "method.proj_dim=32",
        "optim.name=adamw8bit",
        "deepspeed.zero_stage=2",
        "train.num_workers=2",
        "train.epochs=2",
        "train.max_steps=14",
        "train.checkpoint_every=4",
        "train.keep_checkpoints=2",
        "train.log_every=1",
        f"train.storage_path={storage}",
        f"train.name={name}",
        *extra,
    ]


def tune_trial_config(shards, *extra):
    """A tiny 1-worker quickstart config for `raysl tune` trials on digit shards."""
    return load_config(
        "quickstart",
        [
            f"data.shards={shards}",
            "data.image_size=32",
            "data.batch_size=8",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "optim.name=adamw",
            "deepspeed.zero_stage=0",
            "optim.warmup_steps=0",
            "train.num_workers=1",
            "train.cpus_per_worker=1",
            "train.log_every=1",
            *extra,
        ],
    )


ENGINE_BATCH, ENGINE_SIZE = 4, 32  # the engine tests: batch and image size


def engine_config(
    *, zero=0, precision="fp32", grad_accum=1, optimizer="adamw", clip=0.0, weight_decay=0.05, model=None, method=None
):
    """A tiny simclr (or `method`) config for building an engine in-process, DeepSpeed settings as given."""
    heads = {} if (method or {}).get("name") == "mae" else {"proj_hidden_dim": 32, "proj_dim": 16}  # MAE has none
    return from_dict(
        {
            "data": {"batch_size": ENGINE_BATCH, "image_size": ENGINE_SIZE},
            "model": {"backbone": "test_resnet", **(model or {})},
            "method": {"name": "simclr", **heads, **(method or {})},
            # lr 1.0 per 256 images -> 1/64 at batch 4: steps big enough to move bf16 weights
            "optim": {"name": optimizer, "lr": 1.0, "clip_grad": clip, "weight_decay": weight_decay},
            "deepspeed": {"zero_stage": zero, "precision": precision, "grad_accum": grad_accum},
        }
    )
