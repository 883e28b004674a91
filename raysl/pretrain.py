"""`raysl pretrain`: validate the recipe, then run the trainer on Ray Train workers, with
the evaluations that watch a run (online kNN, held-out loss) plugged in as callbacks.
This module sits above train/ and eval/ and is the one place that joins them."""

from __future__ import annotations

import argparse
import json
import os

from raysl.config import Config
from raysl.errors import RunFailed, UserError
from raysl.train import storage


def run_dir(cfg: Config) -> str:
    """`train.storage_path/train.name`: an absolute local path, or a bucket URI."""
    return storage.run_dir(cfg.train.storage_path, cfg.train.name)


def validate(cfg: Config) -> None:
    """Everything that can be checked before Ray starts."""
    from raysl.data import mixture
    from raysl.data.buckets import check_buckets
    from raysl.methods.base import method_class
    from raysl.models.backbone import check_backbone_name
    from raysl.train.run_views import spec_for
    from raysl.train.steps import rows_per_step, total_steps, val_steps

    check_buckets(  # one look at each bucket, so a wrong name, key or endpoint is one line before Ray starts
        {
            "data.shards": mixture.set_paths(cfg.data.shards),
            "train.storage_path": cfg.train.storage_path,
            "eval.knn_shards": cfg.eval.knn_shards,
            "eval.knn_val_shards": cfg.eval.knn_val_shards,
            "eval.val_shards": cfg.eval.val_shards,
        }
    )
    sets = mixture.from_config(cfg.data)  # data.shards (one set or a list) and data.weights, each set read
    from raysl.train.engine import check_config

    check_config(cfg)
    from raysl.eval.monitor import check_config as check_monitor

    check_monitor(cfg)  # the online kNN set is labeled and not empty
    cls = method_class(cfg.method.name)
    check_backbone_name(cfg.model.backbone)
    spec_for(cfg, cls)
    most = cfg.train.max_workers  # the most workers share the images: the fewest per worker
    if cfg.train.elastic and not sets.single:
        raise UserError(
            f"config key train.num_workers: {cfg.train.num_workers} makes the run elastic, but data.shards is a "
            "mixture, which resumes only on the worker count its epoch started with; set one number of workers"
        )
    if cfg.eval.val_shards and val_steps(cfg, most) < 1:
        raise UserError(
            f"config key eval.val_shards: {cfg.eval.val_shards} gives each of {most} worker(s) fewer "
            f"than data.batch_size = {cfg.data.batch_size} images; use a larger held-out set or a smaller batch"
        )
    if total_steps(cfg, most, sets=sets) < 1:
        raise UserError(
            f"data.shards gives each of {most} worker(s) fewer than data.batch_size x "
            f"deepspeed.grad_accum = {rows_per_step(cfg)} images per epoch; "
            "lower the batch size or use more images"
        )
    if cfg.deepspeed.precision == "fp16" and not cfg.train.gpus_per_worker:
        raise UserError("config key deepspeed.precision: fp16 needs GPUs; use bf16 or fp32 on CPU")


def has_checkpoints(directory: str, *, complete: bool = False) -> bool:
    """Whether the run (a local dir or a URI) has a checkpoint_* directory; with `complete`,
    one that an attempt can resume from (the newest such is what the workers will load)."""
    from raysl.train.recovery import newest_complete

    if complete:
        return newest_complete(directory)[0] is not None
    return bool(storage.subdirs(directory, "checkpoint_"))


def train_loop_per_worker(raw: dict) -> None:
    """What each Ray Train worker runs: the trainer with this run's callbacks."""
    from raysl.runtime import warm_workers

    if raw.get("warm_workers"):  # first: the data tasks' processes start while this one imports and sets up
        warm_workers(**raw["warm_workers"])
    from raysl.config import from_dict
    from raysl.eval.monitor import KnnCallback
    from raysl.train.trainer import Trainer
    from raysl.train.val_loss import ValLoss

    cfg = from_dict(raw["config"])
    callbacks = [*([KnnCallback()] if cfg.eval.knn_shards else []), *([ValLoss()] if cfg.eval.val_shards else [])]
    trainer = Trainer(
        cfg,
        raw["run_dir"],
        callbacks=callbacks,
        resume_from=raw.get("resume_from"),
        report_every=raw.get("report_every", 0),
        pins=raw.get("shard_pins"),
    )
    trainer.fit()


def make_trainer(
    cfg: Config, out: str, *, callbacks: list | None = None, resume_from: str | None = None, report_every: int = 0
):
    """The TorchTrainer of a run whose directory is `out`. `callbacks` are Ray Train
    UserCallbacks, `resume_from` a checkpoint path to start from when the run has none of
    its own yet, `report_every` N also reports metrics (no checkpoint) every N steps;
    raysl.tune uses these three."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysl.data import mixture
    from raysl.runtime import keep_data_stats_here, train_logging
    from raysl.train.run_views import data_task_warmup

    keep_data_stats_here()
    gpus = cfg.train.gpus_per_worker
    resources = {"CPU": cfg.train.cpus_per_worker, **({"GPU": gpus} if gpus else {}), **cfg.train.worker_resources}
    t = cfg.train
    if t.elastic:
        from raysl.train.elastic import ElasticWatch

        watch = ElasticWatch(out, resources, t.min_workers, wait_s=t.resize_check_s, timeout_s=t.min_workers_timeout_s)
        callbacks = [*(callbacks or []), watch]
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.to_dict(),
            "run_dir": out,
            "resume_from": resume_from,
            "report_every": report_every,
            # the index file of each shard set, fixed at the run's first start (out/shard_sets.json)
            "shard_pins": mixture.pin(cfg.data, out),
            "warm_workers": data_task_warmup(cfg),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=(t.min_workers, t.max_workers) if t.elastic else t.num_workers,  # type: ignore[arg-type]
            use_gpu=gpus > 0,
            resources_per_worker=resources,
            placement_strategy=cfg.train.placement_strategy,
            elastic_resize_monitor_interval_s=t.resize_check_s,  # type: ignore[call-arg]  # Ray 2.60 has it
        ),
        run_config=ray.train.RunConfig(
            name=cfg.train.name,
            storage_path=os.path.dirname(out) if not storage.is_uri(out) else cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # a reclaimed node (a drain notice) restarts the group without counting against max_failures
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]  # Ray 2.60 has it; its stubs lag
                max_failures=cfg.train.max_failures, max_preemption_failures=-1
            ),
            callbacks=callbacks or None,
            logging_config=train_logging(),  # type: ignore[call-arg]  # Ray 2.60 has it; its stubs lag
        ),
    )


def pretrain(cfg: Config, *, address: str | None = None, resume: bool = False) -> dict:
    from raysl.runtime import check_driver_node, init_ray
    from raysl.train.metrics import plot_curves, read_metrics

    validate(cfg)
    out = run_dir(cfg)
    if has_checkpoints(out) and not resume:
        raise UserError(f"run {out} already has checkpoints: pass --resume to continue it, or set train.name=NEW")
    if resume and not has_checkpoints(out, complete=True):
        raise UserError(f"--resume: run {out} has no complete checkpoint to resume from")
    storage.write_text(f"{out}/config.yaml", cfg.to_yaml())
    print(init_ray(address, quiet=False), flush=True)
    if cfg.train.driver_resources:
        check_driver_node(cfg.train.driver_resources)
    import ray.train

    try:
        result = make_trainer(cfg, out).fit()
    except ray.train.TrainingFailedError as exc:
        from raysl.train.recovery import failure_summary

        raise RunFailed(failure_summary(out, exc, cfg.train.max_failures)) from exc
    files = storage.RunFiles(out, fetch=("metrics.jsonl",))  # a URI's metrics.jsonl, fetched to plot it
    try:
        plots = [f"{out}/{os.path.basename(p)}" for p in plot_curves(files.local)]
        rows = read_metrics(files.local)
    finally:
        files.close()  # uploads the plots to a URI
    summary = {
        "run_dir": out,
        "steps": rows[-1]["step"] if rows else None,
        "final_loss": rows[-1]["loss"] if rows else None,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "plots": plots,
    }
    return summary


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a shipped recipe name (e.g. quickstart) or a YAML path")
    p.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.lr=0.001 train.num_workers=2")
    p.add_argument("--resume", action="store_true", help="continue the run (train.name) from its latest checkpoint")


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.config import load_config

    cfg = load_config(args.recipe, args.overrides)
    print(json.dumps(pretrain(cfg, address=args.address, resume=args.resume)))
