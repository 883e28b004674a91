"""The trainer each Ray Train worker runs: setup, restore, step, checkpoint, report. It
knows methods only through `Method` (forward -> loss, after_step) and everything else a
run measures along the way (online kNN, held-out loss, pictures) through `Callback`s, so
every method runs through the same engine and train/ depends on neither eval/ nor a method."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import ray.data
import ray.train
import ray.train.collective
import torch

from raysl.config import Config
from raysl.data import mixture, reader
from raysl.data.ahead import NextEpoch
from raysl.data.gpu_views import GPUViews
from raysl.data.views import block_tensor, normalize
from raysl.methods.base import Method, collapse_warning
from raysl.optim.schedules import apply
from raysl.train import checkpoint, host_memory, preemption, recovery, storage, upload
from raysl.train.batch import Batch, forward
from raysl.train.build import build, worker_seed
from raysl.train.callback import Callback
from raysl.train.engine import DTYPES
from raysl.train.metrics import MetricsLog, global_metrics, say
from raysl.train.run_views import spec_for
from raysl.train.steps import epoch_steps, global_batch, rows_per_step, val_steps


def train_step(engine, method: Method, optimizer, micro_batches, values: dict) -> dict:
    """One optimizer step, the same in every run and in `raysl bench step`: this step's
    schedule values onto the optimizer's groups, then forward / backward / `engine.step()`
    for each micro-batch (a Batch or a list of views; DeepSpeed steps the optimizer on the
    last of its grad_accum), then the method's `after_step` (EMA teachers, queues). Returns
    the last micro-batch's outputs."""
    apply(optimizer, values)
    out: dict = {}
    for batch in micro_batches:
        out = forward(engine, batch, values)
        engine.backward(out["loss"])
        engine.step()
    method.after_step(values)
    return out


class Trainer:
    """One attempt of a run on this worker. `fit()` = `setup()`, `restore()`, then
    `step()` until the run's last step, with `checkpoint()` and `report()` on the way."""

    stream: reader.ViewBatches | mixture.MixedBatches  # this epoch's batches, from the position trained to
    _it: Iterator[dict]

    def __init__(
        self,
        cfg: Config,
        run_dir: str,
        *,
        callbacks: Sequence[Callback] = (),
        resume_from: str | None = None,
        report_every: int = 0,
        pins: dict | None = None,
    ):
        self.cfg, self.run_dir, self.callbacks = cfg, run_dir, list(callbacks)
        self.resume_from, self.report_every = resume_from, report_every
        self.pins = pins  # the index file of each shard set (mixture.pin): appends do not change them
        self.state: dict[str, Any] = {"step": 0, "epoch": 0, "position": 0, "skipped": 0, "drawn": {}}
        self.next_epoch = NextEpoch()  # when to open the next epoch's stream
        self.first_step = 0  # the step this attempt started from
        self.log: MetricsLog | None = None  # rank 0's
        self.files: storage.RunFiles | None = None  # rank 0's

    # --- setup ---------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.uploads = upload.Uploads(
            self.rank, in_background=upload.background(cfg.train.checkpoint_upload, self.run_dir)
        )
        torch.set_num_threads(cfg.train.cpus_per_worker)
        data_context = ray.data.DataContext.get_current()
        data_context.enable_progress_bars = False  # raysl prints its own progress
        data_context.print_on_execution_start = False  # not one plan per epoch and worker
        on_gpu = torch.cuda.is_available() and cfg.train.gpus_per_worker
        self.device = torch.device("cuda", ctx.get_local_rank()) if on_gpu else torch.device("cpu")
        self.dtype = DTYPES[cfg.deepspeed.precision]
        if host_memory.wanted(cfg.deepspeed.zero_stage, bool(on_gpu)):
            host_memory.return_freed_memory()

        self.sets = mixture.from_config(cfg.data, self.pins)
        self.steps = epoch_steps(cfg, self.world, cfg.train.epochs, sets=self.sets)
        self.total = min(sum(self.steps), cfg.train.max_steps) if cfg.train.max_steps else sum(self.steps)
        self.rows_per_step = rows_per_step(cfg)
        self.global_batch = global_batch(cfg, self.world)
        built = build(cfg, world_size=self.world, total_steps=self.total)
        self.method, self.schedules = built.method, built.schedules
        self.optimizer, self.engine = built.optimizer, built.engine
        self.spec = spec_for(cfg, type(self.method))
        self.device_views = GPUViews(self.spec, self.device) if cfg.data.augment_on == "worker" else None
        for callback in self.callbacks:
            callback.setup(self)

    def restore(self) -> None:
        """Start from the newest complete checkpoint (Ray Train's, or one only the run's
        storage holds: rank 0 decides, every worker loads its own partition of it)."""
        cfg, rank = self.cfg, self.rank
        start = None
        if rank == 0:
            registered = ray.train.get_checkpoint()
            start = recovery.choose_start(self.run_dir, registered.path if registered else None, self.resume_from)
        start = ray.train.collective.broadcast_from_rank_zero(start)
        if start["checkpoint"]:
            with checkpoint.fetched(start["checkpoint"], rank=rank, world_size=self.world) as (d, _):
                self.state = checkpoint.load(d, self.engine, rank=rank, world_size=self.world)
            self.state.setdefault("drawn", {})  # images per set of a mixture (checkpoints before mixtures: none)
        else:
            torch.manual_seed(worker_seed(cfg.train.seed, rank))  # per-worker randomness (drop-path, masks)
        if rank != 0:
            return
        # rank 0's files: written in the run dir, or staged locally and synced to a bucket URI
        self.files = files = storage.RunFiles(self.run_dir, fetch=("metrics.jsonl", recovery.ATTEMPTS))
        for name, problem in start["skipped"]:
            say(recovery.skipped_line(name, problem))
        attempt = recovery.record_attempt(
            files.local,
            {
                "start_step": self.state["step"],
                "first_step": self.state["step"] + 1,
                "checkpoint": start["checkpoint"] and os.path.basename(start["checkpoint"]),
                "source": start["source"],
                "skipped": [name for name, _ in start["skipped"]],
                "world_size": self.world,
                "rank0_pid": os.getpid(),
                "rank0_actor_id": ray.get_runtime_context().get_actor_id(),
            },
        )
        self.log = MetricsLog(files.local, total_steps=self.total, resume_step=self.state["step"])
        what = (
            f"{cfg.method.name} on {cfg.model.backbone}, {self.world} worker(s), {self.total} steps, "
            f"global batch {self.global_batch}"
        )
        say(recovery.start_line(attempt, what))
        files.sync()  # attempts.jsonl reaches a URI run before the first step

    # --- data ----------------------------------------------------------------------------

    def view_data(self, shards: str, epoch: int, position: int, index: str | None = None) -> ray.data.Dataset:
        cfg = self.cfg
        return reader.read_views(
            shards,
            self.spec,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world,
            start=position,
            window=cfg.data.shuffle_window,
            concurrency=cfg.data.augment_tasks or cfg.train.cpus_per_worker,
            batch_size=reader.block_rows(self.spec, cfg.data.batch_size, pixels=self.device_views is not None),
            num_cpus=cfg.data.task_cpus,
            resources=cfg.data.task_resources,
            index=index,
            pixels_only=self.device_views is not None,
        )

    def view_batches(self, shards: str, epoch: int, position: int) -> reader.ViewBatches:
        data = self.view_data(shards, epoch, position)
        return reader.ViewBatches(data, batch_size=self.cfg.data.batch_size, start=position)

    def batches_from(self, position: int, epoch: int | None = None):
        """An epoch's training batches from `position` (default: this epoch's):
        reader.ViewBatches for one shard set, mixture.MixedBatches for a mixture."""
        epoch = self.state["epoch"] if epoch is None else epoch
        return self.sets.batches(
            lambda s, start: self.view_data(s.path, epoch, start, s.index),
            seed=self.cfg.train.seed,
            epoch=epoch,
            rank=self.rank,
            world_size=self.world,
            batch_size=self.cfg.data.batch_size,
            start=position,
            drawn=self.state["drawn"],
        )

    def to_batch(self, batch: dict) -> Batch:
        if self.device_views is not None:
            views = [v.to(self.dtype) for v in self.device_views.from_pixels(batch["pixels"], batch["plans"])]
        else:
            views = [
                normalize(block_tensor(batch[f"view_{v}"]).to(self.device)).to(self.dtype)
                for v in range(self.spec.n_views)
            ]
        masks = block_tensor(batch["masks"]).to(self.device).bool() if self.spec.masks is not None else None
        return Batch(views, masks)

    def val_batches(self) -> Iterator[Batch]:
        """The first batches of the held-out set's views: the same images at every evaluation,
        and the same number of batches on every worker (its forward passes are collective)."""
        n = val_steps(self.cfg, self.world)
        for done, batch in enumerate(self.view_batches(self.cfg.eval.val_shards, 0, 0)):
            if done == n:
                return
            yield self.to_batch(batch)

    def _micro_batches(self) -> Iterator[Batch]:
        """The views of this step's grad_accum micro-batches, read as they are trained on."""
        for _ in range(self.cfg.deepspeed.grad_accum):
            t0 = time.perf_counter()
            try:
                batch = next(self._it)
            except StopIteration:  # corrupt images thinned this worker's share: start it over
                self.state["skipped"] += self.stream.skipped
                self.stream = self.batches_from(0)
                self._it = iter(self.stream)
                batch = next(self._it)
            waited = time.perf_counter() - t0
            self.data_wait += waited
            if self.state["step"] == self.first_step:
                self.next_epoch.saw_fill(waited)  # the run's first batch: a pipeline's whole fill
            yield self.to_batch(batch)

    # --- the loop ------------------------------------------------------------------------

    def step(self) -> tuple[dict, dict]:
        """One optimizer step on the stream: (the method's outputs, the step's global metrics)."""
        self.values = values = {**self.schedules.at(self.state["step"]), "step": self.state["step"]}
        t0, self.data_wait = time.perf_counter(), 0.0
        out = train_step(self.engine, self.method, self.optimizer, self._micro_batches(), values)
        seconds = time.perf_counter() - t0
        self.next_epoch.saw_step(seconds)
        self.state["step"] += 1
        self.state["position"] = self.stream.position
        metrics = global_metrics(
            out,
            self.state,
            self.stream.skipped,
            values,
            self.global_batch / seconds,
            preempted=preemption.requested(),
            drawn=self.state["drawn"],
        )
        metrics["data_wait_s"] = round(self.data_wait, 4)  # of this step's time, waiting for batches
        return out, metrics

    def checkpoint(self, metrics: dict) -> None:
        """Every worker saves its part and reports it with the step's metrics."""
        state = dict(self.state, skipped=self.state["skipped"] + self.stream.skipped)
        self.uploads.wait()  # the previous checkpoint's upload (train.checkpoint_upload)
        d = tempfile.mkdtemp(prefix="raysl_ckpt_")  # deleted once uploaded
        checkpoint.save(d, self.engine, rank=self.rank, world_size=self.world, state=state)
        self.uploads.report(metrics, d)
        if self.files:
            self.files.sync()  # URI runs: metrics.jsonl, TensorBoard, pictures up to this checkpoint

    def report(self, out: dict, metrics: dict) -> None:
        """Rank 0: the metrics into metrics.jsonl / TensorBoard / the progress line, the
        method's pictures of the step, and a loud warning when the embeddings collapse."""
        if not (self.log and self.files):
            return
        step = self.state["step"]
        self.log.log(metrics, show=step % self.cfg.train.log_every == 0 or step == self.total)
        self.method.draw(out, step, self.files.local)
        warning = collapse_warning(metrics, getattr(self.method, "embedding_dim", 0))
        if warning:
            say(warning)

    def fit(self) -> None:
        self.setup()
        self.restore()
        cfg, state = self.cfg, self.state
        ahead = None  # the next epoch's batches, opened before this epoch ends
        self.first_step = state["step"]
        with preemption.sigterm_as_request():  # a SIGTERM finishes the step, checkpoints, stops
            while state["step"] < self.total:
                step_in_epoch = state["position"] // self.rows_per_step
                if step_in_epoch >= self.steps[state["epoch"]]:  # resumed at an epoch's last step
                    state.update(epoch=state["epoch"] + 1, position=0)
                    continue
                self.stream, ahead = ahead or self.batches_from(state["position"]), None
                self._it = iter(self.stream)
                while step_in_epoch < self.steps[state["epoch"]] and state["step"] < self.total:
                    ahead = ahead or self.open_next_epoch(step_in_epoch)
                    out, metrics = self.step()
                    step_in_epoch += 1
                    preempted = metrics.pop("preempted_workers", 0)  # SIGTERM on any worker: checkpoint, stop
                    for callback in self.callbacks:
                        callback.on_step(self, out, metrics)
                    self.report(out, metrics)
                    last = state["step"] == self.total
                    if state["step"] % cfg.train.checkpoint_every == 0 or last or preempted:
                        self.checkpoint(metrics)
                    elif self.report_every and state["step"] % self.report_every == 0:
                        ray.train.report(metrics)  # metrics only, for Tune's schedulers (raysl.tune)
                    if preempted:
                        self._stop_for_preemption(preempted)
                if step_in_epoch >= self.steps[state["epoch"]]:
                    state["skipped"] += self.stream.skipped
                    state.update(epoch=state["epoch"] + 1, position=0)
        if self.log and self.files:
            self.log.close()
            self.files.close()

    def open_next_epoch(self, step_in_epoch: int):
        """The next epoch's batches, opened (pipeline started) once `next_epoch` says it is
        due and the run goes on into the next epoch; else None."""
        epoch, left = self.state["epoch"], self.steps[self.state["epoch"]] - step_in_epoch
        if (
            not self.next_epoch.due(left, self.steps[epoch])
            or epoch + 1 >= len(self.steps)
            or self.state["step"] + left >= self.total
        ):
            return None
        batches = self.batches_from(0, epoch + 1)
        batches.open()
        return batches

    def _stop_for_preemption(self, workers: int) -> None:
        self.uploads.wait()  # the checkpoint just written reaches storage before the worker stops
        step = self.state["step"]
        if self.log:
            say(
                f"raysl: preemption notice (SIGTERM) on {workers} worker(s): checkpoint written at step "
                f"{step}, stopping; the run continues from it"
            )
        raise preemption.Preempted(f"SIGTERM on {workers} worker(s); checkpoint written at step {step}")
