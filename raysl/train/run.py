"""`raysl pretrain`: validate the recipe, then run the loop on Ray Train workers."""

from __future__ import annotations

import os

from raysl.config import Config
from raysl.errors import UserError


def _is_uri(path: str) -> bool:
    return "://" in path


def run_dir(cfg: Config) -> str:
    base = cfg.train.storage_path if _is_uri(cfg.train.storage_path) else os.path.abspath(cfg.train.storage_path)
    return f"{base.rstrip('/')}/{cfg.train.name}"


def validate(cfg: Config) -> None:
    """Everything that can be checked before Ray starts."""
    from raysl.data.schema import read_manifest
    from raysl.methods.base import method_class
    from raysl.models.backbone import check_backbone_name
    from raysl.train.loop import spec_for, total_steps, val_steps

    if not cfg.data.shards:
        raise UserError("config key data.shards is empty: point it at a shard set (raysl shards build ... --out DIR)")
    read_manifest(cfg.data.shards)
    from raysl.train.engine import check_config

    check_config(cfg)
    from raysl.eval.monitor import check_config as check_monitor

    check_monitor(cfg)  # the online kNN set is labeled and not empty
    cls = method_class(cfg.method.name)
    check_backbone_name(cfg.model.backbone)
    spec_for(cfg, cls)
    if cfg.eval.val_shards and val_steps(cfg, cfg.train.num_workers) < 1:
        raise UserError(
            f"config key eval.val_shards: {cfg.eval.val_shards} gives each of {cfg.train.num_workers} worker(s) fewer "
            f"than data.batch_size = {cfg.data.batch_size} images; use a larger held-out set or a smaller batch"
        )
    if total_steps(cfg, cfg.train.num_workers) < 1:
        raise UserError(
            f"data.shards gives each of {cfg.train.num_workers} worker(s) fewer than data.batch_size x "
            f"deepspeed.grad_accum = {cfg.data.batch_size * cfg.deepspeed.grad_accum} images per epoch; "
            "lower the batch size or use more images"
        )
    if cfg.deepspeed.precision == "fp16" and not cfg.train.gpus_per_worker:
        raise UserError("config key deepspeed.precision: fp16 needs GPUs; use bf16 or fp32 on CPU")


def _has_checkpoints(directory: str) -> bool:
    return os.path.isdir(directory) and any(
        n.startswith("checkpoint_") and os.path.isdir(os.path.join(directory, n)) for n in os.listdir(directory)
    )


def make_trainer(cfg: Config, out: str, *, callbacks: list | None = None, resume_from: str | None = None,
                 report_every: int = 0):
    """The TorchTrainer of a run whose directory is `out`. `callbacks` are Ray Train
    UserCallbacks, `resume_from` a checkpoint path to start from when the run has none of
    its own yet, `report_every` N also reports metrics (no checkpoint) every N steps;
    raysl.tune uses these three."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysl.train.loop import train_loop_per_worker

    gpus = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": out,
            "fail_at_step": int(os.environ["RAYSL_FAIL_AT_STEP"]) if os.environ.get("RAYSL_FAIL_AT_STEP") else None,
            "resume_from": resume_from,
            "report_every": report_every,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=gpus > 0,
            resources_per_worker={
                "CPU": cfg.train.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **cfg.train.worker_resources
            },
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=os.path.dirname(out) if not _is_uri(out) else cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=callbacks or None,
        ),
    )


def pretrain(cfg: Config, *, address: str | None = None, resume: bool = False) -> dict:
    from raysl.runtime import init_ray
    from raysl.train.metrics import plot_curves, read_metrics

    validate(cfg)
    out = run_dir(cfg)
    if not _is_uri(out):
        if _has_checkpoints(out) and not resume:
            raise UserError(f"run {out} already has checkpoints: pass --resume to continue it, or set train.name=NEW")
        if resume and not _has_checkpoints(out):
            raise UserError(f"--resume: run {out} has no checkpoint to resume from")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.yaml"), "w") as f:
            f.write(cfg.to_yaml())
    print(init_ray(address, quiet=False), flush=True)
    result = make_trainer(cfg, out).fit()
    plots = plot_curves(out) if not _is_uri(out) else []
    rows = read_metrics(out) if not _is_uri(out) else []
    summary = {
        "run_dir": out,
        "steps": rows[-1]["step"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "plots": plots,
    }
    return summary
