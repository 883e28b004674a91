"""The per-worker training loop that Ray Train runs. It knows methods only through
`Method` (forward -> loss, after_step), so every method runs through the same engine."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np
import ray.data
import ray.train
import ray.train.collective
import torch
import torch.distributed as dist

from raysl.config import Config, from_dict
from raysl.data import reader
from raysl.data.schema import read_manifest
from raysl.data.views import normalize, view_spec
from raysl.eval.monitor import KnnMonitor
from raysl.methods.base import build_method
from raysl.optim.optimizers import build_optimizer, param_groups
from raysl.optim.schedules import Schedules, apply, scaled_lr
from raysl.train import checkpoint, preemption, recovery, storage
from raysl.train.engine import DTYPES, initialize
from raysl.train.metrics import MetricsLog, say
from raysl.train.val_loss import held_out_loss


def spec_for(cfg: Config, method_cls):
    """The views a run streams: the preset (data.views, else the method's default) with the
    data.* crop overrides, checked against what the method can use. Every problem is a
    UserError naming the config key."""
    from raysl.data.views import PRESETS
    from raysl.errors import UserError

    d = cfg.data
    name = d.views or method_cls.default_views
    if name not in PRESETS:
        raise UserError(f"config key data.views: {name!r} is not a views preset; choose one of: {', '.join(PRESETS)}")
    for key in ("image_size", "local_size"):
        if 0 < getattr(d, key) < 8:
            raise UserError(
                f"config key data.{key}: {getattr(d, key)} is too small (0 for the preset's size, else >= 8)"
            )
    if d.global_crops == 0:
        raise UserError(
            "config key data.global_crops: 0 leaves no global crop; every method needs at least one (-1: the preset's)"
        )
    kwargs = {}
    if d.image_size:
        kwargs["global_size"] = d.image_size
    if d.global_crops >= 0:
        kwargs["global_crops"] = d.global_crops
    if d.global_scale:
        kwargs["global_scale"] = tuple(d.global_scale)
    if d.local_crops >= 0:
        kwargs["local_crops"] = d.local_crops
    if d.local_size:
        kwargs["local_size"] = d.local_size
    if d.local_scale:
        kwargs["local_scale"] = tuple(d.local_scale)
    spec = view_spec(name, **kwargs)

    n_global = spec.n_global
    n_local = spec.n_views - n_global
    method = method_cls.name
    least, most = method_cls.global_crops
    if n_global < least or (most is not None and n_global > most):
        words = f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
        key = "data.global_crops" if d.global_crops >= 0 else "data.views"
        raise UserError(
            f"config key {key}: method {method} needs {words} global crop(s); "
            f"views {name!r} with these settings give {n_global}"
        )
    if not method_cls.uses_local_crops:
        for key, value, unset in (
            ("local_crops", d.local_crops, -1),
            ("local_size", d.local_size, 0),
            ("local_scale", d.local_scale, []),
        ):
            if value != unset and (key != "local_crops" or value > 0):
                raise UserError(
                    f"config key data.{key}: method {method} uses only its global crop(s), "
                    f"so local crops would be decoded and never used; leave data.{key} unset"
                )
        return spec
    if not n_local:
        for key, value, unset in (("local_size", d.local_size, 0), ("local_scale", d.local_scale, [])):
            if value != unset:
                raise UserError(
                    f"config key data.{key}: the views have no local crops to apply it to "
                    "(set data.local_crops >= 1, or leave it unset)"
                )
    if spec.n_views < method_cls.min_crops:
        raise UserError(
            f"config key data.local_crops: method {method} needs at least {method_cls.min_crops} crops; "
            f"with {n_global} global crop(s) it needs local crops (data.local_crops >= 1)"
        )
    global_size, crops = spec.crops[0].size, spec.per_view()
    if method_cls.local_smaller and n_local and crops[n_global].size == global_size:
        key = "data.local_size" if d.local_size else "data.image_size"
        raise UserError(
            f"config key {key}: {method} tells global from local crops by their size, so local crops "
            f"must not be {global_size} px like the global ones"
        )
    return spec


def epoch_steps(cfg: Config, world_size: int, epochs: int) -> list[int]:
    """Steps of each epoch, planned only as far as the run goes: with train.max_steps, up to
    the epoch where the steps reach it. One permutation of the shards per epoch planned
    (about 25 ms at 1 M shards: 2.5 s for 100 epochs without max_steps, `raysl bench plan`)."""
    manifest = read_manifest(cfg.data.shards)
    rows_per_step = cfg.data.batch_size * cfg.deepspeed.grad_accum
    steps: list[int] = []
    for e in range(epochs):
        if cfg.train.max_steps and sum(steps) >= cfg.train.max_steps:
            break
        steps.append(
            reader.steps_per_epoch(
                manifest, batch_size=rows_per_step, seed=cfg.train.seed, epoch=e, world_size=world_size
            )
        )
    return steps


def val_steps(cfg: Config, world_size: int) -> int:
    """Batches of the held-out set each worker scores for val_loss (0: the set is too small)."""
    manifest = read_manifest(cfg.eval.val_shards)
    n = reader.steps_per_epoch(
        manifest, batch_size=cfg.data.batch_size, seed=cfg.train.seed, epoch=0, world_size=world_size
    )
    return min(n, cfg.eval.val_batches)


def total_steps(cfg: Config, world_size: int) -> int:
    n = sum(epoch_steps(cfg, world_size, cfg.train.epochs))
    return min(n, cfg.train.max_steps) if cfg.train.max_steps else n


def make_schedules(cfg: Config, total: int, world_size: int) -> Schedules:
    """The run's per-step schedules: lr (linearly scaled to the global batch) with warmup
    and cosine, weight decay, EMA momentum, teacher temperature."""
    global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * world_size
    wd_end = cfg.optim.weight_decay_end if cfg.optim.weight_decay_end >= 0 else cfg.optim.weight_decay
    return Schedules.build(
        total_steps=total,
        warmup_steps=min(cfg.optim.warmup_steps, total - 1),
        lr=scaled_lr(cfg.optim.lr, global_batch),
        min_lr=cfg.optim.min_lr,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=wd_end,
        ema_momentum=cfg.method.ema_momentum,
        ema_momentum_end=cfg.method.ema_momentum_end,
        teacher_temp=cfg.method.teacher_temp,
        teacher_temp_warmup=cfg.method.teacher_temp_warmup,
        teacher_temp_warmup_steps=min(cfg.method.teacher_temp_warmup_steps, total - 1),
    )


def make_optimizer(cfg: Config, method: torch.nn.Module, schedules: Schedules) -> torch.optim.Optimizer:
    """The plain torch/bitsandbytes optimizer over the method's param groups, before DeepSpeed wraps it."""
    return build_optimizer(
        cfg.optim.name,
        param_groups(method, cfg.optim.weight_decay),
        lr=schedules.lr[0],
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        momentum=cfg.optim.momentum,
    )


def train_loop_per_worker(raw: dict) -> None:
    cfg = from_dict(raw["config"])
    run_dir = raw["run_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    data_context = ray.data.DataContext.get_current()
    data_context.enable_progress_bars = False  # raysl prints its own progress
    data_context.print_on_execution_start = False  # not one plan per epoch and worker
    device = (
        torch.device("cuda", ctx.get_local_rank())
        if torch.cuda.is_available() and cfg.train.gpus_per_worker
        else torch.device("cpu")
    )
    dtype = DTYPES[cfg.deepspeed.precision]

    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    method = build_method(cfg)
    if cfg.model.compile:
        compile_backbone(method.backbone, backend=cfg.model.compile_backend)
    spec = spec_for(cfg, type(method))
    steps = epoch_steps(cfg, world, cfg.train.epochs)
    total = min(sum(steps), cfg.train.max_steps) if cfg.train.max_steps else sum(steps)
    global_batch = cfg.data.batch_size * cfg.deepspeed.grad_accum * world
    schedules = make_schedules(cfg, total, world)
    optimizer = make_optimizer(cfg, method, schedules)
    engine = initialize(method, optimizer, cfg)
    monitor = KnnMonitor.from_config(cfg, cfg.data.image_size or spec.crops[0].size)  # online kNN, or None

    state = {"step": 0, "epoch": 0, "position": 0, "skipped": 0}
    start = None
    if rank == 0:  # the newest complete checkpoint, Ray Train's or one only the run's storage holds
        registered = ray.train.get_checkpoint()
        start = recovery.choose_start(run_dir, registered.path if registered else None, raw.get("resume_from"))
    start = ray.train.collective.broadcast_from_rank_zero(start)
    if start["checkpoint"]:
        with ray.train.Checkpoint(start["checkpoint"]).as_directory() as d:
            state = checkpoint.load(d, engine, rank=rank, world_size=world)
    else:
        torch.manual_seed(cfg.train.seed * 1000 + rank + 1)  # per-worker randomness (drop-path, masks)
    log = files = None
    if rank == 0:
        # rank 0's files: written in the run dir, or staged locally and synced to a bucket URI
        files = storage.RunFiles(run_dir, fetch=("metrics.jsonl", recovery.ATTEMPTS))
        for name, problem in start["skipped"]:
            say(recovery.skipped_line(name, problem))
        attempt = recovery.record_attempt(
            files.local,
            {
                "start_step": state["step"],
                "first_step": state["step"] + 1,
                "checkpoint": start["checkpoint"] and os.path.basename(start["checkpoint"]),
                "source": start["source"],
                "skipped": [name for name, _ in start["skipped"]],
                "world_size": world,
                "rank0_pid": os.getpid(),
                "rank0_actor_id": ray.get_runtime_context().get_actor_id(),
            },
        )
        log = MetricsLog(files.local, total_steps=total, resume_step=state["step"])
        say(
            recovery.start_line(
                attempt,
                f"{cfg.method.name} on {cfg.model.backbone}, {world} worker(s), "
                f"{total} steps, global batch {global_batch}",
            )
        )
        files.sync()  # attempts.jsonl reaches a URI run before the first step

    def view_batches(shards: str, epoch: int, position: int):
        ds = reader.read_views(
            shards,
            spec,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=rank,
            world_size=world,
            start=position,
            window=cfg.data.shuffle_window,
            concurrency=cfg.data.augment_tasks or cfg.train.cpus_per_worker,
            num_cpus=cfg.data.task_cpus,
            resources=cfg.data.task_resources,
        )
        return reader.ViewBatches(ds, batch_size=cfg.data.batch_size, start=position)

    def batches_from(position: int):
        return view_batches(cfg.data.shards, state["epoch"], position)

    def to_views(batch) -> list[torch.Tensor]:
        return [normalize(torch.from_numpy(batch[f"view_{v}"]).to(device)).to(dtype) for v in range(spec.n_views)]

    def val_batches():
        """The first batches of the held-out set's views: the same images at every evaluation,
        and the same number of batches on every worker (its forward passes are collective)."""
        n = val_steps(cfg, world)
        for done, batch in enumerate(view_batches(cfg.eval.val_shards, 0, 0)):
            if done == n:
                return
            yield to_views(batch)

    def micro_batches():
        """The views of this step's grad_accum micro-batches, read as they are trained on."""
        nonlocal stream, it, data_wait
        for _ in range(cfg.deepspeed.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:  # corrupt images thinned this worker's share: start it over
                state["skipped"] += stream.skipped
                stream = batches_from(0)
                it = iter(stream)
                batch = next(it)
            data_wait += time.perf_counter() - t0
            yield to_views(batch)

    with preemption.sigterm_as_request():  # a SIGTERM finishes the step, checkpoints, stops
        while state["step"] < total:
            step_in_epoch = state["position"] // (cfg.data.batch_size * cfg.deepspeed.grad_accum)
            if step_in_epoch >= steps[state["epoch"]]:  # resumed from a checkpoint at an epoch's last step
                state.update(epoch=state["epoch"] + 1, position=0)
                continue
            stream = batches_from(state["position"])
            it = iter(stream)
            while step_in_epoch < steps[state["epoch"]] and state["step"] < total:
                values = {**schedules.at(state["step"]), "step": state["step"]}
                data_wait = 0.0  # seconds this step waited for its batches (this worker)
                t0 = time.perf_counter()
                out = train_step(engine, method, optimizer, micro_batches(), values)
                state["step"] += 1
                step_in_epoch += 1
                state["position"] = stream.position
                metrics = _global_metrics(
                    out,
                    state,
                    stream.skipped,
                    values,
                    global_batch / (time.perf_counter() - t0),
                    preempted=preemption.requested(),
                )
                metrics["data_wait_s"] = round(data_wait, 4)
                preempted = metrics.pop("preempted_workers", 0)  # SIGTERM on any worker: checkpoint now, then stop
                if monitor and monitor.due(state["step"], total):
                    metrics.update(monitor.evaluate(method.backbone))
                if cfg.eval.val_shards and (state["step"] % cfg.eval.val_every == 0 or state["step"] == total):
                    metrics["val_loss"] = held_out_loss(engine, method, val_batches(), values)
                if log:
                    log.log(metrics, show=state["step"] % cfg.train.log_every == 0 or state["step"] == total)
                    _report_pictures_and_collapse(out, metrics, method, files.local)
                last = state["step"] == total
                if state["step"] % cfg.train.checkpoint_every == 0 or last or preempted:
                    with tempfile.TemporaryDirectory() as d:
                        checkpoint.save(
                            d,
                            engine,
                            rank=rank,
                            world_size=world,
                            state=dict(state, skipped=state["skipped"] + stream.skipped),
                        )
                        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))
                    if files:
                        files.sync()  # URI runs: metrics.jsonl, TensorBoard, pictures up to this checkpoint
                elif raw.get("report_every") and state["step"] % raw["report_every"] == 0:
                    ray.train.report(metrics)  # metrics only, for Tune's schedulers (raysl.tune)
                if preempted:
                    if log:
                        say(
                            f"raysl: preemption notice (SIGTERM) on {preempted} worker(s): checkpoint written at step "
                            f"{state['step']}, stopping; the run continues from it"
                        )
                    raise preemption.Preempted(
                        f"SIGTERM on {preempted} worker(s); checkpoint written at step {state['step']}"
                    )
            if step_in_epoch >= steps[state["epoch"]]:
                state["skipped"] += stream.skipped
                state.update(epoch=state["epoch"] + 1, position=0)
    if log:
        log.close()
        files.close()


def compile_backbone(backbone: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`model.compile=true`: compile the backbone in place (`nn.Module.compile`), so its
    state-dict keys stay those of the eager model (no `_orig_mod.` prefix) and
    checkpoints, weights.safetensors and exports are the same either way."""
    backbone.compile(backend=backend)
    return backbone


def train_step(engine, method, optimizer, micro_batches, values: dict) -> dict:
    """One optimizer step, the same in every run and in `raysl bench step`: this step's
    schedule values onto the optimizer's groups, then forward / backward / `engine.step()`
    for each micro-batch (a list of views; DeepSpeed steps the optimizer on the last of
    its grad_accum), then the method's `after_step` (EMA teachers, queues). Returns the
    last micro-batch's outputs."""
    apply(optimizer, values)
    out = None
    for views in micro_batches:
        out = engine(views, values)
        engine.backward(out["loss"])
        engine.step()
    method.after_step(values)
    return out


def _report_pictures_and_collapse(out: dict, metrics: dict, method, run_dir: str) -> None:
    """Rank 0: positive/negative score histograms when the method returned them
    (Feature Transformation), and a loud warning when the embeddings collapse."""
    from raysl.methods.base import collapse_warning

    if "hist_pos" in out and "hist_neg" in out:
        from raysl.methods.feature_transform_plots import plot_score_histograms

        folder = os.path.join(run_dir, "score_histograms")
        os.makedirs(folder, exist_ok=True)
        plot_score_histograms(
            out["hist_pos"],
            out["hist_neg"],
            metrics["step"],
            os.path.join(folder, f"step_{metrics['step']:07d}.png"),
            pos_raw=out.get("hist_pos_raw"),
            neg_raw=out.get("hist_neg_raw"),
        )
    warning = collapse_warning(metrics, getattr(method, "embedding_dim", 0))
    if warning:
        say(warning)


def _global_metrics(
    out: dict, state: dict, skipped_now: int, values: dict, images_per_s: float, preempted: bool = False
) -> dict:
    """Losses and counters averaged/summed over workers, so every rank logs the same numbers.
    Only scalar outputs are metrics (methods may also return score tensors for histograms).
    `preempted` rides on the same all-reduce: `preempted_workers` counts the workers that
    received a preemption notice (present only when some did)."""
    scalars = {k: float(v.detach().float()) for k, v in out.items() if v.numel() == 1}
    names = sorted(scalars)
    t = torch.tensor(
        [scalars[k] for k in names] + [float(preempted), float(state["skipped"] + skipped_now)], dtype=torch.float64
    )
    if dist.is_initialized():
        dist.all_reduce(t)
        world = dist.get_world_size()
    else:
        world = 1
    averaged = {k: float(t[i]) / world for i, k in enumerate(names)}
    return {
        "step": state["step"],
        "epoch": state["epoch"],
        **averaged,
        "lr": float(values["lr"]),
        "weight_decay": float(values["weight_decay"]),
        "images_per_s": float(np.round(images_per_s, 2)),
        "skipped_corrupt": int(t[-1]),
        **({"preempted_workers": int(t[-2])} if t[-2] else {}),
    }
