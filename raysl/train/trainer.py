"""The trainer each Ray Train worker runs: setup, restore, step, checkpoint, report. It
knows methods only through `Method` (forward -> loss, after_step) and everything else a
run measures along the way (online kNN, held-out loss, pictures) through `Callback`s, so
every method runs through the same engine and train/ depends on neither eval/ nor a method."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import ray.data
import ray.train
import ray.train.collective
import torch
import torch.distributed as dist

from raysl.config import Config
from raysl.data import cache, epochs, mixture, plan, reader
from raysl.data.ahead import NextEpoch
from raysl.data.gpu_views import GPUViews
from raysl.data.views import block_tensor, normalize
from raysl.errors import UserError
from raysl.methods.base import Method, collapse_warning, method_class
from raysl.optim.schedules import apply
from raysl.train import checkpoint, host_memory, preemption, recovery, storage, upload
from raysl.train.batch import Batch, forward
from raysl.train.build import build
from raysl.train.callback import Callback
from raysl.train.engine import DTYPES
from raysl.train.metrics import MetricsLog, global_metrics, say
from raysl.train.run_views import spec_for
from raysl.train.steps import epoch_steps, val_steps


def train_step(engine, method: Method, optimizer, micro_batches, values: dict) -> dict:
    """One optimizer step, the same in every run and in `raysl bench step`: this step's
    schedule values onto the optimizer's groups, then forward / backward / `engine.step()`
    for each micro-batch (a Batch or a list of views; DeepSpeed steps the optimizer on the
    last of its grad_accum), then the method's `after_step` (EMA teachers, queues). Returns
    the last micro-batch's outputs, its scalars (the loss, ...) the mean over the micro-batches."""
    apply(optimizer, values)
    out: dict = {}
    sums: dict = {}
    n = 0
    for batch in micro_batches:
        out = forward(engine, batch, values)
        engine.backward(out["loss"])
        engine.step()
        n += 1
        for k, v in out.items():
            if v.numel() == 1:
                sums[k] = sums.get(k, 0) + v.detach()
    method.after_step(values)
    return {**out, **{k: v / n for k, v in sums.items()}} if n > 1 else out


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of worker `rank`'s generators (torch CPU and CUDA: drop-path, masks) in
    optimizer step `step`: a run resumed from any checkpoint, on any number of workers,
    draws what an uninterrupted run at that worker count draws."""
    return int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint32)[0])


class Trainer:
    """One attempt of a run on this worker. `fit()` = `setup()`, `restore()`, then
    `step()` until the run's last step, with `checkpoint()` and `report()` on the way."""

    stream: epochs.EpochBatches | mixture.MixedBatches | plan.PlanBatches  # this epoch's batches, from where it stands
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
        # The run's state, the same on every worker and saved by rank 0 (raysl_state.json): step and
        # epoch; the epoch's `streams` (the worker count it started with, raysl.data.plan),
        # `consumed` (rows of each stream trained on, as of the attempt's start or the epoch's),
        # `per_stream` (rows each stream gives a step), `epoch_step` of `epoch_steps`; `images`
        # trained on in the run and the run's first `global_batch` (schedules run on their
        # ratio); `skipped` and `drawn` (counts summed over workers: rank 0 carries the run's).
        self.state: dict[str, Any] = {}
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
        self.cached = self.cache_set()
        self.start = self.choose_start()
        self.plan_run(self.start["state"])
        cfg = self.cfg  # the attempt's batch size and accumulation (plan_run)
        self.spec = spec_for(cfg, method_class(cfg.method.name))
        self.epoch_streams = epochs.Streams(  # one set: one Ray Data execution over many epochs
            lambda epoch, start, n: self.view_data(
                self.sets.sets[0].path, epoch, start, self.sets.sets[0].index, epochs=n
            ),
            self.epochs_per_execution,
            batch_size=cfg.data.batch_size,
        )
        self.device_views = GPUViews(self.spec, self.device) if cfg.data.augment_on == "worker" else None
        # the first batches fill (Ray Data's plan, its tasks' processes, the first blocks) while
        # DeepSpeed builds the engine, rather than after
        self.first_stream = self.open_first_stream()
        built = build(cfg, world_size=self.world, total_steps=self.schedule_steps)
        self.method, self.schedules = built.method, built.schedules
        self.optimizer, self.engine = built.optimizer, built.engine
        for callback in self.callbacks:
            callback.setup(self)

    def cache_set(self) -> dict | None:
        """A small single set read once into the object store (data.cache): rank 0 reads and
        decides, every worker gets the refs."""
        table = None
        if self.rank == 0 and self.sets.single:
            s, manifest = self.sets.sets[0], self.sets.manifest(0)
            if cache.fits(manifest, self.cfg.data.cache_share):
                table = ray.put(cache.put_set(s.path, manifest, reader.READ_COLUMNS))
        # One ref to the table of refs: Ray Train's broadcast warns above 1,000 bytes (about 12
        # shards' refs). In a list, or Ray would resolve the ref when it reaches the broadcast's actor.
        [table] = ray.train.collective.broadcast_from_rank_zero([table])
        return ray.get(table) if table is not None else None

    def choose_start(self) -> dict:
        """The checkpoint this attempt starts from and the run's state in it (None: a new run):
        rank 0 decides, every worker gets the same."""
        start = None
        if self.rank == 0:
            registered = ray.train.get_checkpoint()
            start = recovery.choose_start(self.run_dir, registered.path if registered else None, self.resume_from)
            try:
                start["state"] = checkpoint.run_state(start["checkpoint"]) if start["checkpoint"] else None
            except UserError as exc:
                start = {"error": str(exc)}
        start = ray.train.collective.broadcast_from_rank_zero(start)
        if "error" in start:
            raise UserError(start["error"])
        return start

    def plan_run(self, saved: dict | None) -> None:
        """The attempt's batching (raysl.data.plan; the configured one unless the worker count
        changed), the state to go on from, the steps of each epoch left and the run's total."""
        cfg, world = self.cfg, self.world
        if saved is None and cfg.train.elastic and cfg.train.on_resize == "keep_global_batch":
            # an elastic run's global batch is the one of its max workers, whatever number it starts with
            # (the nearest below that its first workers train as whole micro-batches of data.batch_size)
            accum = cfg.train.max_workers * cfg.deepspeed.grad_accum // world
            self.batching = plan.Batching(world, cfg.data.batch_size, accum)
        elif saved is None:
            self.batching = plan.Batching(world, cfg.data.batch_size, cfg.deepspeed.grad_accum)
        if saved is None:
            g = self.batching.global_batch
            saved = {"step": 0, "epoch": 0, "streams": world, "consumed": [0] * world, "per_stream": g // world}
            saved |= {"epoch_step": 0, "epoch_steps": None, "images": 0, "global_batch": g, "skipped": 0, "drawn": {}}
        else:
            streams = saved["streams"]
            if streams != world and not self.sets.single:
                raise UserError(
                    f"this run reads a mixture of shard sets and its epoch {saved['epoch']} started on {streams} "
                    f"worker(s); a mixture resumes only on the same number: set train.num_workers={streams} "
                    f"(this attempt has {world})"
                )
            if cfg.train.on_resize == "keep_worker_batch":
                self.batching = plan.keep_worker_batch(streams, world, cfg.data.batch_size, cfg.deepspeed.grad_accum)
            else:
                self.batching = plan.keep_global_batch(saved["global_batch"], streams, world, cfg.data.batch_size)
            smaller = self.batching.global_batch < saved["global_batch"]
            if smaller and cfg.train.on_resize == "keep_global_batch" and self.rank == 0:
                say(
                    f"raysl: a global batch of {saved['global_batch']} does not split over {world} worker(s) "
                    f"reading {streams} data stream(s) in whole micro-batches; training with "
                    f"{self.batching.global_batch}, the nearest smaller one that does (lr scaled to it)"
                )
            saved = dict(saved, skipped=saved["skipped"] if self.rank == 0 else 0)
            saved["drawn"] = {k: v if self.rank == 0 else 0 for k, v in saved["drawn"].items()}
        b = self.batching
        self.cfg = replace(
            cfg,
            data=replace(cfg.data, batch_size=b.micro),
            deepspeed=replace(cfg.deepspeed, grad_accum=b.accum),
        )
        self.state = state = saved
        per_stream = b.global_batch // state["streams"]
        if state["epoch_steps"] is None or state["per_stream"] != per_stream:  # a new run, or another batch
            rows = self.sets.rows_per_worker(seed=cfg.train.seed, epoch=state["epoch"], world_size=state["streams"])
            left = plan.steps_left([int(n) for n in rows], state["consumed"], per_stream)
            state.update(epoch_steps=state["epoch_step"] + left, per_stream=per_stream)
        before = state["step"] - state["epoch_step"]  # steps of the earlier epochs
        later = epoch_steps(
            self.cfg,
            world,
            cfg.train.epochs,
            sets=self.sets,
            first=state["epoch"] + 1,
            done=before + state["epoch_steps"],
        )
        self.steps = {state["epoch"]: state["epoch_steps"]} | {state["epoch"] + 1 + i: n for i, n in enumerate(later)}
        total = before + sum(self.steps.values())
        self.total = min(total, cfg.train.max_steps) if cfg.train.max_steps else total
        # the schedules run on images seen / the run's first global batch, to the run's last image
        images = state["images"] + (self.total - state["step"]) * b.global_batch
        self.schedule_steps = max(1, math.ceil(images / state["global_batch"]))
        self.global_batch = b.global_batch

    def open_first_stream(self):
        """The attempt's first batches, opened (pipeline started); None when the attempt
        resumes at the end of an epoch or of the run, where `fit` moves on first."""
        state = self.state
        if state["epoch_step"] >= state["epoch_steps"] or state["step"] >= self.total:
            return None
        batches = self.current_batches()
        batches.open()
        return batches

    def restore(self) -> None:
        """Start from the newest complete checkpoint (Ray Train's, or one only the run's
        storage holds: rank 0 decided in `choose_start`, every worker loads its own
        partition of it)."""
        cfg, rank, start = self.cfg, self.rank, self.start
        if start["checkpoint"]:
            with checkpoint.fetched(start["checkpoint"], rank=rank, world_size=self.world) as (d, _):
                checkpoint.load(d, self.engine, rank=rank, world_size=self.world)
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
        written_by = start["state"] and start["state"]["workers"]
        if written_by and written_by != self.world:
            b = self.batching
            say(
                f"raysl: resumed on {self.world} worker(s) from a checkpoint written by {written_by}; global batch "
                f"{b.global_batch} ({b.accum} micro-batch(es) of {b.micro} per worker)"
            )
        files.sync()  # attempts.jsonl reaches a URI run before the first step

    # --- data ----------------------------------------------------------------------------

    def view_data(
        self,
        shards: str,
        epoch: int,
        position: int,
        index: str | None = None,
        *,
        stream: int | None = None,
        streams: int | None = None,
        keep: tuple[int, int, int] | None = None,
        epochs: int = 1,
    ) -> ray.data.Dataset:
        """The views of a stream (default: this worker's of `self.world`) from `position`,
        and of the next `epochs - 1` epochs (reader.read_rows)."""
        cfg = self.cfg
        return reader.read_views(
            shards,
            self.spec,
            seed=cfg.train.seed,
            epoch=epoch,
            rank=self.rank if stream is None else stream,
            world_size=self.world if streams is None else streams,
            start=position,
            keep=keep,
            epochs=epochs,
            cache=self.cached,
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

    def current_batches(self):
        """This epoch's training batches from where it stands: this worker's stream, or, when
        the epoch started on another number of workers, its part of every step (data.plan)."""
        state = self.state
        if state["streams"] == self.world:
            return self.batches_from(state["consumed"][self.rank])
        self.plan_opened_at = state["epoch_step"]
        s, per_stream = self.sets.sets[0], state["per_stream"]
        return plan.PlanBatches(
            lambda v, start, keep: self.view_data(
                s.path, state["epoch"], start, s.index, stream=v, streams=state["streams"], keep=keep
            ),
            slices=plan.worker_slices(state["streams"], per_stream, self.world, self.rank),
            consumed=list(state["consumed"]),
            per_stream=per_stream,
            micro=self.cfg.data.batch_size,
        )

    def consumed(self) -> list[int]:
        """Rows of each of the epoch's streams trained on so far (every worker calls it)."""
        state = self.state
        if isinstance(self.stream, plan.PlanBatches):
            done = (state["epoch_step"] - self.plan_opened_at) * state["per_stream"]
            return [c + done for c in state["consumed"]]
        positions = [self.stream.position]
        if dist.is_initialized() and self.world > 1:
            positions = [0] * self.world
            dist.all_gather_object(positions, self.stream.position)
        return positions

    def epochs_per_execution(self, epoch: int) -> int:
        """Epochs one Ray Data execution reads from `epoch` on: those left in the run, at
        most as many as fit epochs.MAX_ITEMS shuffle windows."""
        windows = reader.windows_per_epoch(
            self.sets.manifest(0), world_size=self.world, window=self.cfg.data.shuffle_window
        )
        return epochs.epochs_per_execution(windows, max(self.steps) - epoch + 1)

    def batches_from(self, position: int, epoch: int | None = None):
        """An epoch's training batches of this worker's stream from `position` (default: this
        epoch's): for one shard set, its epoch of an execution over many (data.epochs.Streams); for
        a mixture, mixture.MixedBatches."""
        epoch = self.state["epoch"] if epoch is None else epoch
        if self.sets.single:
            return self.epoch_streams.batches(epoch, position)
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
        for _ in range(self.batching.accum):
            t0 = time.perf_counter()
            try:
                batch = next(self._it)
            except StopIteration:  # corrupt images thinned this worker's share: start it over
                assert not isinstance(self.stream, plan.PlanBatches)  # it repeats rows instead
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
        state = self.state
        torch.manual_seed(step_seed(self.cfg.train.seed, state["step"], self.rank))  # seeds CUDA's too
        at = state["images"] // state["global_batch"]  # the schedules' step: images seen / the first global batch
        self.values = values = {**self.schedules.at(at), "step": state["step"]}
        t0, self.data_wait = time.perf_counter(), 0.0
        out = train_step(self.engine, self.method, self.optimizer, self._micro_batches(), values)
        seconds = time.perf_counter() - t0
        self.next_epoch.saw_step(seconds)
        state["step"] += 1
        state["epoch_step"] += 1
        state["images"] += self.global_batch
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
        drawn = {k: metrics[f"drawn/{k}"] for k in self.state["drawn"]}
        state = dict(
            self.state, consumed=self.consumed(), skipped=metrics["skipped_corrupt"], drawn=drawn, workers=self.world
        )
        # once the previous upload has ended (train.checkpoint_upload), into a local folder deleted once uploaded
        self.uploads.report(
            metrics, lambda d: checkpoint.save(d, self.engine, rank=self.rank, world_size=self.world, state=state)
        )
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
        ahead = self.first_stream  # opened in setup; later the next epoch's batches, opened before this epoch ends
        self.first_step = state["step"]
        with preemption.sigterm_as_request():  # a SIGTERM finishes the step, checkpoints, stops
            while state["step"] < self.total:
                if state["epoch_step"] >= state["epoch_steps"]:  # resumed at an epoch's last step
                    self.next_epoch_state()
                    continue
                self.stream, ahead = ahead or self.current_batches(), None
                self._it = iter(self.stream)
                while state["epoch_step"] < state["epoch_steps"] and state["step"] < self.total:
                    ahead = ahead or self.open_next_epoch(state["epoch_step"])
                    out, metrics = self.step()
                    preempted = metrics.pop("preempted_workers", 0)  # SIGTERM on any worker: checkpoint, stop
                    for callback in self.callbacks:
                        callback.on_step(self, out, metrics)
                    self.report(out, metrics)
                    last = state["step"] == self.total
                    drain = None  # a node of the group is being reclaimed: checkpoint, train no further
                    if state["step"] % cfg.train.preemption_check_steps == 0 and not last:
                        drain = ray.train.get_preemption_info()  # a collective: every rank, the same steps
                    if state["step"] % cfg.train.checkpoint_every == 0 or last or preempted or drain:
                        self.checkpoint(metrics)
                    elif self.report_every and state["step"] % self.report_every == 0:
                        ray.train.report(metrics)  # metrics only, for Tune's schedulers (raysl.tune)
                    if preempted:
                        self._stop_for_preemption(preempted)
                    if drain:
                        self._wait_for_reclaim(drain)
                if state["epoch_step"] >= state["epoch_steps"]:
                    state["skipped"] += self.stream.skipped
                    self.next_epoch_state()
        if self.log and self.files:
            self.log.close()
            self.files.close()

    def next_epoch_state(self) -> None:
        """The next epoch, planned with this attempt's workers as its streams."""
        epoch, world = self.state["epoch"] + 1, self.world
        self.state.update(epoch=epoch, epoch_step=0, epoch_steps=self.steps.get(epoch, 0), streams=world)
        self.state.update(consumed=[0] * world, per_stream=self.batching.per_worker)

    def open_next_epoch(self, step_in_epoch: int):
        """The next epoch's batches, opened (pipeline started) once `next_epoch` says it is
        due and the run goes on into the next epoch; else None."""
        epoch, left = self.state["epoch"], self.steps[self.state["epoch"]] - step_in_epoch
        if (
            not self.next_epoch.due(left, self.steps[epoch])
            or epoch + 1 not in self.steps
            or self.state["step"] + left >= self.total
        ):
            return None
        batches = self.batches_from(0, epoch + 1)
        batches.open()
        return batches

    def _wait_for_reclaim(self, drain) -> None:
        self.uploads.wait()  # the checkpoint just written reaches storage before the node goes
        if self.log:
            deadline = drain.deadline_ms and time.strftime("%H:%M:%S", time.localtime(drain.deadline_ms / 1000))
            say(
                f"raysl: node(s) {', '.join(n[:12] for n in sorted(drain.preempted_node_to_ranks))} "
                f"(rank(s) {drain.preempted_ranks}) "
                f"being reclaimed{f' at {deadline}' if deadline else ''}: checkpoint written at step "
                f"{self.state['step']}; waiting for the restart on the nodes left, which continues from it"
            )
        preemption.wait_for_reclaim()

    def _stop_for_preemption(self, workers: int) -> None:
        self.uploads.wait()  # the checkpoint just written reaches storage before the worker stops
        step = self.state["step"]
        if self.log:
            say(
                f"raysl: preemption notice (SIGTERM) on {workers} worker(s): checkpoint written at step "
                f"{step}, stopping; the run continues from it"
            )
        raise preemption.Preempted(f"SIGTERM on {workers} worker(s); checkpoint written at step {step}")
