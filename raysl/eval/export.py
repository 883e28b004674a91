"""`raysl export`: a run's trained backbone as timm loads it (`model.safetensors` plus timm's
`config.json`), with a model card and the training data's attribution list beside it."""

from __future__ import annotations

import argparse
import json
import os

from raysl.config import Config
from raysl.data.view_plans import EVAL_CROP_FRACTION
from raysl.data.views import IMAGENET_MEAN, IMAGENET_STD
from raysl.errors import UserError
from raysl.paths import resolve_path

WEIGHTS = "model.safetensors"
TIMM_CONFIG = "config.json"


def eval_image_size(cfg: Config) -> int:
    """The global crop size the run trained on (data.image_size, else its views preset's)."""
    from raysl.methods.base import method_class
    from raysl.train.run_views import spec_for

    return cfg.data.image_size or max(c.size for c in spec_for(cfg, method_class(cfg.method.name)).crops)


def create_model_call(name: str, out_dir: str, img_size: int | None, global_pool: str = "") -> str:
    """The exact `timm.create_model` call that loads the export (written into the card)."""
    size = (f", img_size={img_size}" if img_size else "") + (f", global_pool={global_pool!r}" if global_pool else "")
    path = os.path.join(os.path.abspath(out_dir), WEIGHTS)
    return (
        f"model = timm.create_model({name!r}, pretrained=True, num_classes=0{size},\n"
        f"                          pretrained_cfg_overlay=dict(file={path!r}))"
    )


def takes_img_size(backbone) -> bool:
    return hasattr(backbone, "patch_embed")  # ViT-like timm models are built for one image size


# what export reads of a run in a bucket, besides config.yaml and the checkpoint's weights
RUN_FILES = ("metrics.jsonl", "eval_*.json")


def export(run_dir: str, out_dir: str, *, shards: str | None = None) -> dict:
    """Write the latest checkpoint's student backbone to `out_dir` (see module doc); refuses
    a directory that is not a run, a run with no checkpoint and weights that do not fit the
    backbone config.yaml names. `shards` overrides where the training shard set now lives.
    A run in a bucket is read through a temporary copy of only the files export needs
    (weights.local_run)."""
    from raysl.data.buckets import check_bucket
    from raysl.eval.weights import local_run
    from raysl.train.storage import is_uri

    run_dir = run_dir.rstrip("/")
    if is_uri(out_dir):
        raise UserError(
            f"--out {out_dir}: export writes a local folder (its model card names the weights' path); "
            "give a folder here and copy it to the bucket after"
        )
    check_bucket(run_dir, "--ckpt")
    with local_run(run_dir, RUN_FILES) as local:
        return _export(local, out_dir, shards=shards, source=run_dir if is_uri(run_dir) else os.path.abspath(run_dir))


def _export(run_dir: str, out_dir: str, *, shards: str | None, source: str) -> dict:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    from raysl.eval.model_card import write_card
    from raysl.eval.weights import load_backbone

    backbone, cfg, step = load_backbone(run_dir)
    size = eval_image_size(cfg)
    if os.path.isfile(out_dir):
        raise UserError(f"--out {out_dir}: is a file; give a directory to write the export into")
    os.makedirs(out_dir, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in backbone.state_dict().items()},
        os.path.join(out_dir, WEIGHTS),
        metadata={"format": "pt", "raysl_run": source, "step": str(step)},
    )
    config_path = os.path.join(out_dir, TIMM_CONFIG)
    data_config = dict(mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=EVAL_CROP_FRACTION, interpolation="bicubic")
    if cfg.data.image_size:
        data_config["input_size"] = (3, size, size)
    pool_args = {"global_pool": cfg.model.global_pool} if cfg.model.global_pool else None
    save_config_for_hf(backbone, config_path, data_config=data_config, model_args=pool_args)
    with open(config_path) as f:
        timm_cfg = json.load(f)
    # the registry's tag and license describe timm's ImageNet weights, not these
    timm_cfg["pretrained_cfg"].pop("license", None)
    timm_cfg["pretrained_cfg"]["tag"] = f"raysl_{cfg.method.name}"
    with open(config_path, "w") as f:
        json.dump(timm_cfg, f, indent=2)
    img_size = size if takes_img_size(backbone) else None
    card = write_card(
        out_dir,
        run_dir,
        cfg,
        step,
        create_call=create_model_call(cfg.model.backbone, out_dir, img_size, cfg.model.global_pool),
        timm_cfg=timm_cfg,
        shards=shards,
    )
    return {
        "out": out_dir,
        "weights": os.path.join(out_dir, WEIGHTS),
        "config": config_path,
        "step": step,
        "backbone": cfg.model.backbone,
        "img_size": img_size,
        **card,
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ckpt", type=resolve_path, required=True, help="the run directory (its latest checkpoint is exported)"
    )
    p.add_argument(
        "--out",
        type=resolve_path,
        required=True,
        help="folder for model.safetensors, config.json, README.md, ATTRIBUTIONS.csv",
    )
    p.add_argument(
        "--shards", type=resolve_path, help="where the training shard set lives now, if it moved since training"
    )


def run_from_args(args: argparse.Namespace) -> None:
    print(json.dumps(export(args.ckpt, args.out, shards=args.shards)))
