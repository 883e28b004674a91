"""`raysl bench checkpoint`: what checkpoints on a bucket cost a run.

A state of `--params` parameters (default ~86 M, a ViT-B's: a stack of 768 x 768 linear
layers, fp32 weights, AdamW8bit state, DeepSpeed ZeRO-2) trained by `--workers` Ray Train
workers (default 2) whose run lives on an S3 bucket: `--storage`, else the bucket of
$AWS_ENDPOINT_URL, else moto's S3 server started on this machine for the bench. Each
worker writes its checkpoint with `raysl.train.checkpoint.save` and hands it to Ray Train
with `raysl.train.upload.Uploads`, as a run does. Measured, mean over the workers:

- `step_s_idle`: a training step with no upload running (mean of `--steps` before the
  checkpoints and as many after the last upload, so both sides see the machine's load);
- `step_s_during_upload_sync`: the step that writes a checkpoint and waits for its upload;
- `step_s_checkpoint_async`: the step that writes a checkpoint and hands it to a background upload;
- `step_s_during_upload_async`: the steps trained while that upload runs (mean; the
  writing step itself is not among them);
- `upload_bytes` (all workers) and `upload_s` (the slowest worker) of one checkpoint;
- `upload_cpu_s`: the CPU time of the threads that copied the background checkpoint, all
  workers together (all of the client's work: they send the S3 parts themselves);
  `upload_server_cpu_s`: the S3 server's, from that checkpoint's step to the upload's end;
- `cpu_per_s_idle`, `cpu_per_s_during_upload_async`: per worker, CPU-seconds per second
  of those steps' wall time: `thread_cpu` of the training thread and `thread_wait_cpu`, its
  time runnable but waiting for a core (`/proc/thread-self/schedstat`); `worker_cpu`, the
  whole worker process (the upload's threads, Ray's and gloo's too); `server_cpu`, the S3
  server the bench started; `machine_busy`, every process on the machine (`/proc/stat`);
- `restore_bytes_per_worker`: bytes the worker that moves the most downloads to resume
  (`raysl.train.checkpoint.fetched`), one entry per world size in `--restore-workers`,
  from a checkpoint written by local processes (a process group on this host, no Ray).

The S3 server stands in for a bucket on other machines, whose CPU a run never pays for:
it runs at the lowest CPU priority (nice 19 and Linux's SCHED_IDLE, below Ray's workers at
nice 15, in its own session whose autogroup is at nice 19), so it gets little more than the
cores the training leaves idle. Its own CPU (`server_cpu`, `upload_server_cpu_s`) is
reported apart from the client's (`upload_cpu_s`); the price is a slower upload on a busy
machine. What it still takes from the steps is the bench's, not a run's: a real bucket
spends none of the node's CPU.

Prints one JSON line."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

from raysl.train.local_world import free_port

WIDTH, BATCH = 768, 8


def _config(workers: int):
    from raysl.config import from_dict

    return from_dict(
        {
            "data": {"batch_size": BATCH},
            "optim": {"name": "adamw8bit"},
            "deepspeed": {"zero_stage": 2, "precision": "fp32", "grad_accum": 1},
            "train": {"num_workers": workers},
        },
        origin="bench checkpoint",
    )


def _engine(params: int, workers: int):
    import torch

    from raysl.optim.optimizers import build_optimizer
    from raysl.train.engine import initialize

    torch.manual_seed(0)
    layers = max(1, round(params / (WIDTH * WIDTH + WIDTH)))
    model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(layers)])
    optimizer = build_optimizer("adamw8bit", [{"params": list(model.parameters())}], lr=1e-4, betas=(0.9, 0.999))
    return initialize(model, optimizer, _config(workers))


def _step(engine, x) -> float:
    t0 = time.perf_counter()
    loss = engine(x).square().mean()
    engine.backward(loss)
    engine.step()
    return time.perf_counter() - t0


def _clock(server_pid: int | None) -> dict[str, float]:
    """Seconds so far, read in the training thread: wall; this thread's CPU and its time
    waiting for a core (`/proc/thread-self/schedstat`); the whole worker's CPU; the S3
    server's CPU; every core's busy time on the machine (`/proc/stat`)."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/thread-self/schedstat") as f:
        on_cpu, waiting, _ = (int(v) / 1e9 for v in f.read().split())
    server = 0.0
    if server_pid:
        with open(f"/proc/{server_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        server = (int(fields[11]) + int(fields[12])) / tick  # utime + stime, its ended threads included
    with open("/proc/stat") as f:
        cpu = [int(v) for v in f.readline().split()[1:]]
    busy = (sum(cpu[:8]) - cpu[3] - cpu[4]) / tick  # all but idle and iowait (guests are counted in user)
    return {
        "wall": time.perf_counter(),
        "thread_cpu": on_cpu,
        "thread_wait_cpu": waiting,
        "worker_cpu": time.process_time(),
        "server_cpu": server,
        "machine_busy": busy,
    }


def _spent(*spans: tuple[dict[str, float], dict[str, float]]) -> dict[str, float]:
    """Per second of wall time within these (start, end) clocks: each figure's growth."""
    wall = sum(b["wall"] - a["wall"] for a, b in spans)
    out = {k: round(sum(b[k] - a[k] for a, b in spans) / wall, 3) for k in spans[0][0] if k != "wall"}
    out["wall"] = round(wall, 3)
    return out


def _any(flag: bool) -> bool:
    import torch
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _train_worker(raw: dict) -> list[dict] | None:
    """One Ray Train worker: idle steps, then a checkpoint uploaded synchronously, then one
    uploaded in the background while it keeps training."""
    import ray.train
    import torch
    import torch.distributed as dist

    from raysl.train import checkpoint, upload

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    engine = _engine(raw["params"], world)
    x = torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(rank))
    for _ in range(raw["warmup"]):
        _step(engine, x)
    t0 = _clock(raw["server_pid"])
    idle = [_step(engine, x) for _ in range(raw["steps"])]
    t1 = _clock(raw["server_pid"])

    def checkpoint_step(uploads, step: int) -> float:
        t0 = time.perf_counter()
        _step(engine, x)
        uploads.report(
            {"step": step}, lambda d: checkpoint.save(d, engine, rank=rank, world_size=world, state={"step": step})
        )
        return time.perf_counter() - t0

    sync = upload.Uploads(rank, in_background=False)
    sync_s = checkpoint_step(sync, 1)
    background = upload.Uploads(rank, in_background=True)
    before_async = _clock(raw["server_pid"])
    async_s = checkpoint_step(background, 2)
    t2 = _clock(raw["server_pid"])
    during = []
    while _any(background.running):  # steps are collective: every worker steps until all uploads end
        during.append(_step(engine, x))
    t3 = _clock(raw["server_pid"])
    idle += [_step(engine, x) for _ in range(raw["steps"])]  # and as many after: both sides see the same load
    t4 = _clock(raw["server_pid"])
    mine = {
        "idle": statistics.mean(idle),
        "sync": sync_s,
        "async": async_s,
        "during": during,
        "bytes": background.last_bytes,
        "upload_s": background.last_s,
        "upload_cpu_s": background.last_cpu_s,
        "server_cpu_s": t3["server_cpu"] - before_async["server_cpu"],
        "cpu_idle": _spent((t0, t1), (t3, t4)),
        "cpu_during": _spent((t2, t3)) if during else None,
    }
    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return every if rank == 0 else None


def _run_training(
    params: int, workers: int, steps: int, warmup: int, storage: str, server_pid: int | None
) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _train_worker,  # type: ignore[arg-type]  # Ray's stub: a loop may return a value (Result.return_value)
        train_loop_config={"params": params, "steps": steps, "warmup": warmup, "server_pid": server_pid},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench_checkpoint_{uuid.uuid4().hex[:8]}", storage_path=storage),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    return result.return_value  # type: ignore[attr-defined]  # Ray Train V2's Result; its stub lags


def _restore_worker(rank: int, world: int, port: int, params: int, uri: str, out: str) -> None:
    """A process of a local process group: one step, save, upload, then resume from the bucket."""
    import json

    import torch
    import torch.distributed as dist

    from raysl.data.schema import filesystem_and_path
    from raysl.train import checkpoint, storage
    from raysl.train.local_world import join_local_world

    torch.set_num_threads(1)
    join_local_world(rank, world, port)
    engine = _engine(params, world)
    _step(engine, torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(rank)))
    with tempfile.TemporaryDirectory() as d:
        checkpoint.save(d, engine, rank=rank, world_size=world, state={"step": 1})
        fs, dest = filesystem_and_path(uri)
        storage.upload_dir(d, fs, dest, last=storage.worker_listing(rank))
    dist.barrier()
    with checkpoint.fetched(uri, rank=rank, world_size=world) as (local, moved):
        names = storage.listing(local)
        state = checkpoint.load(local, _engine(params, world), rank=rank, world_size=world)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"bytes": moved, "files": names, "step": state["step"]}, f)
    dist.barrier()
    dist.destroy_process_group()


def restore_bytes(params: int, world: int, uri: str) -> list[dict]:
    """Each rank's {"bytes", "files", "step"} when `world` local processes save a checkpoint
    to `uri` and resume from it."""
    import json

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(
            _restore_worker, args=(world, free_port(), params, uri, out), nprocs=world, start_method="spawn"
        )
        ranks = []
        for r in range(world):
            with open(os.path.join(out, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def _moto() -> tuple[subprocess.Popen, dict]:
    """moto's S3 server on a free local port, and the environment that reaches it. It stands
    in for a bucket that lives elsewhere, so it runs at the lowest CPU priority: it gets the
    cores the training leaves idle instead of slowing the steps it measures (moto spends
    about 10 CPU-seconds per GB it stores, several times the client's work)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own scheduling group (Linux's autogroup), set below
        )
        _lowest_priority(proc.pid)
    except OSError as exc:
        raise RuntimeError(f"cannot start moto's S3 server: {exc}") from exc
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "moto's S3 server did not start (pip install 'moto[server]'), or pass --storage s3://BUCKET/PATH"
                ) from None
            time.sleep(0.1)
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    return proc, env


def _lowest_priority(pid: int) -> None:
    """The process `pid` gets only the CPU no one else wants: nice 19 and Linux's SCHED_IDLE,
    below Ray's workers (nice 15) too. Where the kernel groups processes by session
    (autogroup, /proc/sys/kernel/sched_autogroup_enabled), each group gets an equal share of
    the CPU whatever its processes' priority: the process leads its own session and its
    group is set to nice 19 (a 15/1024 share beside the session of the driver and Ray's workers)."""
    os.setpriority(os.PRIO_PROCESS, pid, 19)
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    try:
        with open(f"/proc/{pid}/autogroup", "w") as f:
            f.write("19")
    except OSError:  # no autogroups: the process's own priority is all there is
        pass


def _new_bucket() -> str:
    import pyarrow.fs

    name = f"bench-checkpoint-{uuid.uuid4().hex[:8]}"
    fs = pyarrow.fs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"], allow_bucket_creation=True)
    fs.create_dir(name)
    return f"s3://{name}"


def _delete(path: str) -> None:
    from raysl.data.schema import filesystem_and_path

    fs, p = filesystem_and_path(path)
    fs.delete_dir(p)


def run_checkpoint_bench(
    *,
    params: int = 86_000_000,
    workers: int = 2,
    steps: int = 5,
    warmup: int = 2,
    restore_workers: tuple[int, ...] = (1, 2, 4),
    storage: str | None = None,
    address: str | None = None,
) -> dict:
    from raysl.runtime import init_ray

    server = None
    if storage is None and not os.environ.get("AWS_ENDPOINT_URL"):
        server, env = _moto()
        os.environ.update(env)  # before Ray starts: its local workers inherit it
    try:
        root = (storage or _new_bucket()).rstrip("/")
        init_ray(address)
        ranks = _run_training(params, workers, steps, warmup, f"{root}/train", server.pid if server else None)
        _delete(f"{root}/train")  # what the bench wrote: a local S3 server holds it in memory
        restores = {}
        for w in restore_workers:
            restores[w] = restore_bytes(params, w, f"{root}/restore_{w}/checkpoint")
            _delete(f"{root}/restore_{w}")
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    during = [s for r in ranks for s in r["during"]]
    return {
        "params": params,
        "workers": workers,
        "step_s_idle": round(statistics.mean(r["idle"] for r in ranks), 4),
        "step_s_during_upload_sync": round(statistics.mean(r["sync"] for r in ranks), 4),
        "step_s_checkpoint_async": round(statistics.mean(r["async"] for r in ranks), 4),
        "step_s_during_upload_async": round(statistics.mean(during), 4) if during else None,
        "steps_during_upload_async": len(during) // len(ranks),
        "upload_bytes": sum(r["bytes"] for r in ranks),
        "upload_s": round(max(r["upload_s"] for r in ranks), 3),
        "upload_cpu_s": round(sum(r["upload_cpu_s"] for r in ranks), 3),
        "upload_server_cpu_s": round(ranks[0]["server_cpu_s"], 3) if server is not None else None,
        "cpu_per_s_idle": [r["cpu_idle"] for r in ranks],
        "cpu_per_s_during_upload_async": [r["cpu_during"] for r in ranks],
        "restore_workers": list(restore_workers),
        "restore_bytes_per_worker": [max(r["bytes"] for r in restores[w]) for w in restore_workers],
        "storage": "moto S3 server on this machine, lowest CPU priority (nice 19, SCHED_IDLE, autogroup nice 19)"
        if server is not None
        else root.split("/")[0] + "//...",
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--params", type=int, default=86_000_000, help="parameters of the state (default 86e6, a ViT-B)")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers of the training part (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps with no upload running (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument(
        "--restore-workers",
        default="1,2,4",
        help="world sizes whose restore bytes per worker are measured, comma-separated (default 1,2,4)",
    )
    p.add_argument(
        "--storage",
        default=None,
        help="a bucket URI to write into (default: $AWS_ENDPOINT_URL's S3 API, else moto's server started here)",
    )


def run_from_args(a, address: str | None = None) -> dict:
    return run_checkpoint_bench(
        params=a.params,
        workers=a.workers,
        steps=a.steps,
        warmup=a.warmup,
        restore_workers=tuple(int(w) for w in a.restore_workers.split(",") if w.strip()),
        storage=a.storage,
        address=address,
    )
