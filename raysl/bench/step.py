"""`raysl bench step`: seconds per training step through raysl vs a bare PyTorch loop.

Both sides train the same SimCLR method (`raysl.train.build.build` on one Config, same
seed, so the same initial weights) on the same fixed uint8 view batches, made once from
random pixels (the data pipeline is not measured here; `raysl bench data` does that),
with the same optimizer over the same param groups, the same lr/weight-decay schedule
and the same number of torch threads, in the same run:

- baseline: a bare loop in this process (built with `deepspeed=False`): normalise the
  views, forward, `loss.backward()`, `optimizer.step()`, `optimizer.zero_grad()`,
  `method.after_step` (a no-op for SimCLR), `float(loss)`.
- raysl: a real `ray.train.torch.TorchTrainer` with one worker (`cpus_per_worker=threads`)
  running the training loop's own pieces: the method, schedules, optimizer and DeepSpeed
  engine from `raysl.train.build.build` (ZeRO `zero_stage`, fp32), `train_step`
  (schedules onto the optimizer, forward, `engine.backward`, `engine.step`, `after_step`)
  and the per-step metrics every run logs (`global_metrics` + `MetricsLog.log`).
  Checkpoints are left out: how often they are written is the user's choice.

Each side takes `warmup` untimed steps, then `steps` steps each timed with perf_counter
(the raysl side inside the worker; it returns its times to the driver), and with the
process's CPU time (`*_cpu_s`, `cpu_overhead`: the work done, which other load on the
machine barely changes; it includes each process's own Ray threads). The baseline's
timed steps are split into two halves, one before and one after the raysl side, so a
change of load on a shared machine hits both sides alike, and run at the niceness Ray
gives its workers (15 by default), so other processes take CPU from both alike; the
reported seconds per step are medians. Both sides take the same steps on the same weights, so their first losses
agree and their last losses should stay close (`raysl_loss_*` vs `baseline_loss_*`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

from raysl.errors import UserError

# torch and the rest are imported where used, so `raysl --help` stays quick (the CLI
# takes this module's add_arguments).


def _config(model: str, batch_size: int, image_size: int, threads: int, optimizer: str, zero_stage: int, seed: int):
    from raysl.config import from_dict

    return from_dict(
        {
            "data": {"batch_size": batch_size, "image_size": image_size},
            "model": {"backbone": model},
            "method": {"name": "simclr"},
            "optim": {"name": optimizer},
            "deepspeed": {"zero_stage": zero_stage, "precision": "fp32", "grad_accum": 1},
            "train": {"num_workers": 1, "cpus_per_worker": threads, "seed": seed},
        },
        origin="bench step",
    )


def _views(batch_size: int, image_size: int, seed: int) -> list:
    """The fixed uint8 (B, 3, S, S) batch of SimCLR's two views, as numpy arrays."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [
        torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g).numpy()
        for _ in range(2)
    ]


def _summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "mean": statistics.fmean(times), "min": min(times)}


class _Baseline:
    """The bare PyTorch loop, kept alive so its timed steps can be split around the raysl side."""

    def __init__(self, cfg, views: list, total: int):
        import torch

        from raysl.train.build import build, worker_seed

        built = build(cfg, world_size=1, total_steps=total, deepspeed=False)
        self.method, self.schedules, self.optimizer = built.method, built.schedules, built.optimizer
        self.views = [torch.from_numpy(v) for v in views]
        torch.manual_seed(worker_seed(cfg.train.seed, 0))  # as the loop seeds worker 0
        self.step = 0
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.losses: list[float] = []

    def run(self, n: int, *, timed: bool) -> None:
        from raysl.data.views import normalize
        from raysl.optim.schedules import apply

        for _ in range(n):
            values = {**self.schedules.at(self.step), "step": self.step}
            t0, c0 = time.perf_counter(), time.process_time()
            apply(self.optimizer, values)
            out = self.method([normalize(v) for v in self.views], values)
            out["loss"].backward()
            self.optimizer.step()
            self.optimizer.zero_grad()
            self.method.after_step(values)
            loss = float(out["loss"].detach())
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if timed:
                self.times.append(dt)
                self.cpu.append(dc)
            self.losses.append(loss)
            self.step += 1


def _raysl_worker(raw: dict) -> dict:
    """Runs in the Ray Train worker: the loop's step code on the fixed views, timed here."""
    import ray.train
    import torch

    from raysl.config import from_dict
    from raysl.data.views import normalize
    from raysl.train.build import build, worker_seed
    from raysl.train.engine import DTYPES
    from raysl.train.metrics import MetricsLog, global_metrics
    from raysl.train.steps import global_batch
    from raysl.train.trainer import train_step

    cfg = from_dict(raw["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.train.cpus_per_worker)  # as the trainer does
    dtype = DTYPES[cfg.deepspeed.precision]
    total = raw["total"]
    built = build(cfg, world_size=world, total_steps=total)
    method, schedules, optimizer, engine = built.method, built.schedules, built.optimizer, built.engine
    torch.manual_seed(worker_seed(cfg.train.seed, rank))
    views = [torch.from_numpy(v) for v in raw["views"]]
    images_per_step = global_batch(cfg, world)
    state = {"step": 0, "epoch": 0, "position": 0, "skipped": 0}
    times, cpu, losses = [], [], []
    with tempfile.TemporaryDirectory() as run_dir:
        log = MetricsLog(run_dir, total_steps=total) if rank == 0 else None
        for step in range(total):
            values = {**schedules.at(step), "step": step}
            t0, c0 = time.perf_counter(), time.process_time()
            micro = ([normalize(v).to(dtype) for v in views] for _ in range(cfg.deepspeed.grad_accum))
            out = train_step(engine, method, optimizer, micro, values)
            state["step"] = step + 1
            metrics = global_metrics(out, state, 0, values, images_per_step / (time.perf_counter() - t0))
            if log:
                log.log(metrics, show=False)
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
            losses.append(metrics["loss"])
        if log:
            log.close()
    return {
        "times": times[raw["warmup"] :],
        "cpu": cpu[raw["warmup"] :],
        "losses": losses,
        "torch_threads": torch.get_num_threads(),
        "nice": os.getpriority(os.PRIO_PROCESS, 0),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


def worker_niceness() -> int:
    """The niceness Ray gives its worker processes (15 unless RAY_worker_niceness says otherwise)."""
    import ray

    return ray.get(ray.remote(num_cpus=0)(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())


@contextlib.contextmanager
def niceness(nice: int):
    """Run this process at niceness `nice` (every thread: on Linux it is per thread), so the
    baseline competes for CPU on a busy machine on the same terms as the Ray worker; yields
    the niceness it got. Lowering it again needs privileges: without them it stays raised."""
    tasks = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
    before = os.getpriority(os.PRIO_PROCESS, 0)
    for t in tasks:
        try:
            os.setpriority(os.PRIO_PROCESS, t, nice)
        except (PermissionError, ProcessLookupError):
            pass
    try:
        yield os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        now = [int(t) for t in os.listdir("/proc/self/task")] if os.path.isdir("/proc/self/task") else [0]
        for t in now:  # threads started inside (the OpenMP pool) inherited `nice`
            try:
                os.setpriority(os.PRIO_PROCESS, t, before)
            except (PermissionError, ProcessLookupError):
                pass


def _run_raysl(cfg, views: list, *, total: int, warmup: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            _raysl_worker,  # type: ignore[arg-type]  # Ray's stub: a loop may return a value (Result.return_value)
            train_loop_config={"config": cfg.to_dict(), "views": views, "total": total, "warmup": warmup},
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, resources_per_worker={"CPU": cfg.train.cpus_per_worker}
            ),
            run_config=ray.train.RunConfig(name="bench_step", storage_path=storage),
        )
        result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value  # type: ignore[attr-defined]  # Ray Train V2's Result; its stub lags


def run_step_bench(
    model: str = "resnet18",
    batch_size: int = 32,
    image_size: int = 96,
    steps: int = 20,
    warmup: int = 5,
    threads: int = 1,
    optimizer: str = "adamw",
    zero_stage: int = 0,
    *,
    seed: int = 0,
    address: str | None = None,
) -> dict:
    """Time `steps` training steps (after `warmup`) on each side; see the module docstring.
    Starts a local Ray unless one is connected or `address` names a cluster; shuts down
    only a Ray it started."""
    import ray
    import torch

    from raysl.runtime import init_ray

    if steps < 2 or warmup < 0 or threads < 1:
        raise UserError(f"bench step: need steps >= 2, warmup >= 0, threads >= 1 (got {steps}, {warmup}, {threads})")
    cfg = _config(model, batch_size, image_size, threads, optimizer, zero_stage, seed)
    views = _views(batch_size, image_size, seed)
    total = warmup + steps
    first_half = steps // 2

    started_ray = not ray.is_initialized()
    init_ray(address)
    saved_threads = torch.get_num_threads()
    try:
        cpus = ray.cluster_resources().get("CPU", 0)
        if cpus < threads:
            raise UserError(
                f"bench step: --threads {threads} needs that many CPUs for the Ray worker; Ray has {cpus:g}"
            )
        nice = worker_niceness()
        torch.set_num_threads(threads)
        base = _Baseline(cfg, views, total)
        with niceness(nice) as baseline_nice:
            base.run(warmup, timed=False)
            base.run(first_half, timed=True)
        raysl = _run_raysl(cfg, views, total=total, warmup=warmup)
        with niceness(nice):
            base.run(steps - first_half, timed=True)
    finally:
        torch.set_num_threads(saved_threads)
        if started_ray:
            ray.shutdown()

    b, r = _summary(base.times), _summary(raysl["times"])
    # Ratios are taken from the rounded figures so the printed JSON agrees with itself.
    b_step, r_step = round(b["median"], 4), round(r["median"], 4)
    b_cpu, r_cpu = round(statistics.median(base.cpu), 4), round(statistics.median(raysl["cpu"]), 4)
    return {
        "bench": "step",
        "model": model,
        "batch_size": batch_size,
        "image_size": image_size,
        "threads": threads,
        "optimizer": optimizer,
        "zero_stage": zero_stage,
        "steps": steps,
        "warmup": warmup,
        "baseline_step_s": b_step,
        "raysl_step_s": r_step,
        "overhead": round(r_step / b_step - 1, 4),
        "baseline_mean_s": round(b["mean"], 4),
        "raysl_mean_s": round(r["mean"], 4),
        "baseline_min_s": round(b["min"], 4),
        "raysl_min_s": round(r["min"], 4),
        "baseline_cpu_s": b_cpu,
        "raysl_cpu_s": r_cpu,
        "cpu_overhead": round(r_cpu / b_cpu - 1, 4),
        "baseline_img_s": round(batch_size / b_step, 2),
        "raysl_img_s": round(batch_size / r_step, 2),
        "baseline_loss_first": base.losses[0],
        "raysl_loss_first": raysl["losses"][0],
        "baseline_loss_last": base.losses[-1],
        "raysl_loss_last": raysl["losses"][-1],
        "worker_nice": raysl["nice"],
        "baseline_nice": baseline_nice,
        "worker_torch_threads": raysl["torch_threads"],
        "worker_omp_num_threads": raysl["omp_num_threads"],
        "cpus": os.cpu_count(),
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="resnet18", help="timm backbone (random init)")
    p.add_argument("--batch-size", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--image-size", type=int, default=96, help="image side in pixels (default 96)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side first")
    p.add_argument("--threads", type=int, default=1, help="torch threads on each side (the worker's cpus_per_worker)")
    p.add_argument("--optimizer", default="adamw", help="optim.name on both sides, e.g. adamw8bit (default adamw)")
    p.add_argument(
        "--zero-stage", type=int, default=0, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage of the raysl side"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the views (default 0)")


def run_from_args(a, address: str | None = None) -> dict:
    return run_step_bench(
        a.model,
        a.batch_size,
        a.image_size,
        a.steps,
        a.warmup,
        a.threads,
        a.optimizer,
        a.zero_stage,
        seed=a.seed,
        address=address,
    )
