"""`raysl bench e2e`: wall time of a whole pretraining run, `raysl pretrain` vs a plain loop.

Data: `images` small grey pictures, 28 x 28 as in MNIST, made from scikit-learn's real
8 x 8 handwritten digits (bundled in the wheel, nothing downloaded), each upscaled to
28 x 28 with a seeded random shift and scale so no two are alike, padded to 32 x 32
and stored as RGB PNGs in a shard set of the default shard size.

Both sides train SimCLR (built by `raysl.train.build.build` from one Config: same seed,
same weights, same optimizer and lr schedule) on timm `model` at 32 px with batch
`batch_size` for `steps` steps, on 2 CPUs in all. Each side is a fresh Python process,
timed from its start to its exit, as `time` would show a user who runs it: the
interpreter's start and the imports count on both sides.

- raysl: `raysl pretrain RECIPE`, one worker of 2 CPUs, Ray started by it; the views
  come from the raysl pipeline (`data.views=simclr`, the data tasks sharing the worker's
  cores; with `augment_on="worker"` the tasks only decode and the training worker makes
  the views, `data.augment_on=worker`); the final checkpoint, the loss plots and Ray's
  shutdown are part of its run, as in every run.
- plain: a PyTorch script (2 torch threads) with a 2-worker `torch.utils.data.DataLoader`
  (shuffled, persistent workers) of the same PNGs with lightly's
  `SimCLRTransform(input_size=32)`, when lightly is installed (the `bench` extra);
  otherwise the torchvision v2 recipe of `raysl bench data`.

The plain script runs at the niceness Ray gives its workers (15 by default; its
DataLoader workers inherit it), as `raysl bench step` does, so on a busy shared machine
other processes take CPU from both sides alike. Shares of each side's wall time: startup
(everything but the steps: the process's start, imports, Ray's start and, for raysl, the
final checkpoint and the teardown after the last step), data wait (a step waiting for its
batch) and compute (the rest of the steps); of the data wait, `epoch_turn_s` is the wait
of each later epoch's first step. Sides take turns with `repeats` > 1; each side's output
is kept in a log beside its run while the bench runs.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, cast

import numpy as np


def write_digit_shards(
    directory: str, n: int, seed: int = 0, *, bases: np.ndarray | None = None, by_label: bool = False
) -> str:
    """`n` 28 x 28 grey digits as 32 x 32 RGB PNGs in a shard set (skipped if it exists).
    `bases`: the scikit-learn digits they are drawn from, in turn (default: all of them);
    `by_label`: rows sorted by label, as a folder per class listed in path order gives."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from raysl.bench.methods import write_shards

    if os.path.exists(os.path.join(directory, "manifest.json")):
        return directory
    digits = load_digits()
    bases = np.arange(len(digits.images)) if bases is None else np.asarray(bases)
    rng = np.random.default_rng(seed)
    pngs, labels = [], []
    for i in range(n):
        k = int(bases[i % len(bases)])
        small = Image.fromarray((digits.images[k] * 16).clip(0, 255).astype(np.uint8))
        side = int(rng.integers(20, 29))  # the digit's size inside its 28 x 28 frame
        digit = small.resize((side, side), Image.Resampling.BICUBIC)
        frame = Image.new("L", (28, 28))
        x, y = (int(v) for v in rng.integers(0, 28 - side + 1, size=2))
        frame.paste(digit, (x, y))
        img = Image.new("L", (32, 32))
        img.paste(frame, (2, 2))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="PNG")
        pngs.append(buf.getvalue())
        labels.append(int(digits.target[k]))
    order = np.argsort(labels, kind="stable") if by_label else np.arange(n)
    return write_shards(directory, pngs, np.array(labels), order, shard_size=1000, key="digits28/{i:05d}.png")


def _config(
    shards: str, out: str, *, model: str, batch_size: int, steps: int, seed: int, name: str, augment_on: str = "tasks"
):
    from raysl.config import from_dict

    return from_dict(
        {
            "data": {
                "shards": shards,
                "views": "simclr",
                "image_size": 32,
                "batch_size": batch_size,
                "augment_on": augment_on,
            },
            "model": {"backbone": model},
            "method": {"name": "simclr", "temperature": 0.2, "proj_hidden_dim": 512, "proj_dim": 128},
            "optim": {"name": "adamw", "lr": 0.002, "warmup_steps": 10, "weight_decay": 0.05},
            "deepspeed": {"zero_stage": 0, "precision": "fp32", "grad_accum": 1},
            "train": {
                "name": name,
                "storage_path": out,
                "epochs": 1000,
                "max_steps": steps,
                "num_workers": 1,
                "cpus_per_worker": 2,
                "seed": seed,
                "log_every": max(steps // 5, 1),
                "checkpoint_every": 10**9,
                "keep_checkpoints": 1,
            },
        },
        origin="bench e2e",
    )


def _shares(wall: float, step_times: list[float], waits: list[float], epochs: list[int]) -> dict:
    """Startup, data wait and compute seconds and shares of wall time; `epoch_turn_s` is the
    data wait of each epoch's first step after the first epoch (what a turn between epochs
    costs), part of the data wait."""
    steps_s = sum(step_times)
    wait_s = min(sum(waits), steps_s)
    startup = max(wall - steps_s, 0.0)
    turn_s = sum(w for w, e, before in zip(waits[1:], epochs[1:], epochs) if e != before)
    return {
        "wall_s": round(wall, 2),
        "startup_s": round(startup, 2),
        "data_wait_s": round(wait_s, 2),
        "compute_s": round(steps_s - wait_s, 2),
        "epochs": len(set(epochs)),
        "epoch_turn_s": round(turn_s, 2),
        "epoch_turn_share": round(turn_s / wall, 3),
        "shares": {
            "startup": round(startup / wall, 3),
            "data_wait": round(wait_s / wall, 3),
            "compute": round((steps_s - wait_s) / wall, 3),
        },
    }


def _step_lists(cfg) -> dict:
    """The step times, data waits and epochs of a finished raysl run, from its metrics.jsonl."""
    from raysl.pretrain import run_dir
    from raysl.train.metrics import read_metrics

    rows = read_metrics(run_dir(cfg))
    return {
        "step_times": [cfg.data.batch_size / r["images_per_s"] for r in rows],
        "waits": [r.get("data_wait_s", 0.0) for r in rows],
        "epochs": [r["epoch"] for r in rows],
        "steps": len(rows),
        "final_loss": round(rows[-1]["loss"], 4) if rows else float("nan"),
    }


def _timed_process(cmd: list[str], log: str, nice: int = 0) -> float:
    """Run `cmd` as a fresh process (output to `log`, at niceness `nice`); its wall seconds
    from start to exit. A failed side ends the bench with the log's last lines."""

    def lower_priority() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, nice)

    with open(log, "w") as f:
        t0 = time.perf_counter()
        rc = subprocess.run(
            cmd, stdout=f, stderr=subprocess.STDOUT, preexec_fn=lower_priority if nice else None
        ).returncode
        wall = time.perf_counter() - t0
    if rc != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-20:])
        raise RuntimeError(f"bench e2e: {' '.join(cmd[:4])} ... exited with {rc}; the end of {log}:\n{tail}")
    return wall


def run_raysl_process(cfg, recipe: str, log: str) -> dict:
    """`raysl pretrain RECIPE` as a user runs it: interpreter start, imports, Ray's start, the run,
    the final checkpoint, plots and Ray's shutdown all inside the wall time."""
    wall = _timed_process([sys.executable, "-m", "raysl.cli", "pretrain", recipe], log)
    lists = _step_lists(cfg)
    return _side(wall, lists)


def run_plain_process(recipe: str, steps: int, log: str, nice: int = 0) -> dict:
    """The plain loop as its own script would run: a fresh process (imports included) at
    niceness `nice`, its step lists written to the last line of `log`."""
    cmd = [sys.executable, "-m", "raysl.bench.e2e", "--plain-recipe", recipe, "--steps", str(steps)]
    wall = _timed_process(cmd, log, nice)
    with open(log) as f:
        lists = json.loads(f.read().strip().splitlines()[-1])
    return _side(wall, lists)


def ray_train_floor(cpus: int, storage_path: str) -> None:
    """A Ray Train run that trains nothing, started as raysl starts one (a local Ray with its
    settings, one worker of `cpus` CPUs that imports torch and reports once), then Ray's
    shutdown: what any Ray Train run pays before and after its steps."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from raysl.runtime import init_ray

    init_ray(quiet=True)
    TorchTrainer(
        _report_once,
        scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(name="floor", storage_path=storage_path),
    ).fit()
    ray.shutdown()


def _report_once(config: dict) -> None:
    import ray.train
    import torch  # noqa: F401  # every training worker imports torch

    ray.train.report({"step": 0})


def run_floor_process(cpus: int, storage_path: str, log: str) -> float:
    """`ray_train_floor` as a fresh process: its wall seconds, interpreter start included."""
    cmd = [sys.executable, "-m", "raysl.bench.e2e", "--ray-train-floor", storage_path, "--cpus", str(cpus)]
    return round(_timed_process(cmd, log), 2)


def _side(wall: float, lists: dict) -> dict:
    """A side's figures: the shares of its wall time from its step lists (`_shares`), and
    its steps, last loss and (the plain side's) views."""
    shares = _shares(wall, lists["step_times"], lists["waits"], lists["epochs"])
    return {**shares, **{k: lists[k] for k in ("steps", "final_loss", "views") if k in lists}}


class _Rows:
    def __init__(self, images: list[bytes], transform):
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return tuple(self.transform(Image.open(io.BytesIO(self.images[i])).convert("RGB")))


def _plain_transform():
    try:
        from lightly.transforms import SimCLRTransform
    except ImportError:
        from raysl.bench.data import _PerView
        from raysl.data.view_plans import view_spec

        return "torchvision v2", _PerView(view_spec("simclr", size=32))
    return "lightly SimCLRTransform(input_size=32)", SimCLRTransform(input_size=32)


def run_plain(cfg, steps: int, workers: int = 2) -> dict:
    """The plain loop in this process, its shares over its own wall time (imports before it)."""
    t0 = time.perf_counter()
    lists = plain_loop(cfg, steps, workers)
    return _side(time.perf_counter() - t0, lists)


def plain_loop(cfg, steps: int, workers: int = 2) -> dict:
    """The plain loop: DataLoader + lightly views, the same method, optimizer and schedule.
    Returns each step's time, data wait and epoch, the steps taken, the last loss."""
    import torch

    from raysl.bench.data import read_images
    from raysl.optim.schedules import apply
    from raysl.train.build import build

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.train.cpus_per_worker)
    try:
        built = build(cfg, world_size=1, total_steps=steps, deepspeed=False)
        method, schedules, optimizer = built.method, built.schedules, built.optimizer
        name, transform = _plain_transform()
        loader = torch.utils.data.DataLoader(
            cast("torch.utils.data.Dataset[Any]", _Rows(read_images(cfg.data.shards), transform)),
            batch_size=cfg.data.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=True,
        )
        step, loss = 0, float("nan")
        step_times: list[float] = []
        waits: list[float] = []
        epochs: list[int] = []
        while step < steps:
            it = iter(loader)
            epoch = len(set(epochs))
            while step < steps:
                t_step = time.perf_counter()
                try:
                    views = next(it)
                except StopIteration:
                    break
                waits.append(time.perf_counter() - t_step)
                epochs.append(epoch)
                values = {**schedules.at(step), "step": step}
                apply(optimizer, values)
                out = method(list(views), values)
                out["loss"].backward()
                optimizer.step()
                optimizer.zero_grad()
                method.after_step(values)
                loss = float(out["loss"].detach())
                step_times.append(time.perf_counter() - t_step)
                step += 1
        del it, loader
    finally:
        torch.set_num_threads(threads)
    return {
        "step_times": step_times,
        "waits": waits,
        "epochs": epochs,
        "steps": step,
        "final_loss": round(loss, 4),
        "views": name,
    }


def run_e2e_bench(
    out: str,
    *,
    images: int = 10000,
    steps: int = 300,
    batch_size: int = 128,
    model: str = "resnet18",
    seed: int = 0,
    repeats: int = 1,
    augment_on: str = "tasks",
) -> dict:
    import ray

    from raysl.bench.step import worker_niceness

    shards = write_digit_shards(os.path.join(out, f"digits28_{images}"), images, seed)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    nice = worker_niceness()  # then shut down: the raysl side starts Ray inside its timed span
    ray.shutdown()
    runs: dict[str, list[dict]] = {"plain": [], "raysl": []}
    floors: list[float] = []
    with tempfile.TemporaryDirectory(dir=out) as runs_dir:
        for r in range(repeats):
            kw: dict[str, Any] = dict(model=model, batch_size=batch_size, steps=steps, seed=seed)
            for side, cfg in (
                ("plain", _config(shards, runs_dir, name=f"plain{r}", **kw)),
                ("raysl", _config(shards, runs_dir, name=f"raysl{r}", augment_on=augment_on, **kw)),
            ):
                recipe, log = (os.path.join(runs_dir, f"{side}{r}.{ext}") for ext in ("yaml", "log"))
                with open(recipe, "w") as f:
                    f.write(cfg.to_yaml())
                if side == "plain":
                    runs[side].append(run_plain_process(recipe, steps, log, nice))
                else:
                    runs[side].append(run_raysl_process(cfg, recipe, log))
                print(json.dumps({side: runs[side][-1]}), file=sys.stderr, flush=True)  # kept if a later side fails
            floor_log = os.path.join(runs_dir, f"floor{r}.log")
            floors.append(run_floor_process(cfg.train.cpus_per_worker, runs_dir, floor_log))  # the raysl side's worker
            print(json.dumps({"ray_train_floor_s": floors[-1]}), file=sys.stderr, flush=True)
    ratios = [a["wall_s"] / b["wall_s"] for a, b in zip(runs["raysl"], runs["plain"])]
    result = {
        "bench": "e2e",
        "images": images,
        "steps": steps,
        "batch_size": batch_size,
        "model": model,
        "cpus": os.cpu_count(),
        "repeats": repeats,
        "plain_nice": nice,
        "raysl_augment_on": augment_on,
        "raysl_wall_s": round(statistics.median(r["wall_s"] for r in runs["raysl"]), 2),
        "plain_wall_s": round(statistics.median(r["wall_s"] for r in runs["plain"]), 2),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_spread": {"min": round(min(ratios), 3), "max": round(max(ratios), 3)},
        # what a Ray Train run that trains nothing takes, Ray's start and shutdown included,
        # and how much of raysl's startup is beyond it (raysl's own: imports, data, checkpoint)
        "ray_train_floor_s": round(statistics.median(floors), 2),
        "ray_train_floors_s": floors,
        "raysl_startup_beyond_floor_s": round(
            statistics.median(r["startup_s"] - f for r, f in zip(runs["raysl"], floors)), 2
        ),
    }
    for side, rs in runs.items():
        result[side] = rs[0] if repeats == 1 else rs
    return result


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="bench_e2e", help="folder for the shard set and the runs (default bench_e2e)")
    p.add_argument("--images", type=int, default=10000, help="digit images in the shard set (default 10000)")
    p.add_argument("--steps", type=int, default=300, help="training steps per run (default 300)")
    p.add_argument("--batch-size", type=int, default=128, help="images per step (default 128)")
    p.add_argument("--model", default="resnet18", help="timm backbone (random init)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard set and of both runs (default 0)")
    p.add_argument("--repeats", type=int, default=1, help="runs per side, the sides taking turns (default 1)")
    p.add_argument(
        "--augment-on",
        choices=("tasks", "worker"),
        default="tasks",
        help="raysl's data.augment_on: views made by Ray Data tasks (default) or by the training worker",
    )


def run_from_args(args) -> dict:
    os.makedirs(args.out, exist_ok=True)
    return run_e2e_bench(
        os.path.abspath(args.out),
        images=args.images,
        steps=args.steps,
        batch_size=args.batch_size,
        model=args.model,
        seed=args.seed,
        repeats=args.repeats,
        augment_on=args.augment_on,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="raysl bench e2e", description=__doc__.splitlines()[0])
    add_arguments(p)
    p.add_argument("--plain-recipe", help=argparse.SUPPRESS)  # the plain side's own process: run it, print its steps
    p.add_argument("--ray-train-floor", help=argparse.SUPPRESS)  # the floor's own process, runs in this folder
    p.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ray_train_floor:
        ray_train_floor(args.cpus, args.ray_train_floor)
        return
    if args.plain_recipe:
        from raysl.config import load_config

        print(json.dumps(plain_loop(load_config(args.plain_recipe), args.steps)), flush=True)
        return
    print(json.dumps(run_from_args(args)), flush=True)


if __name__ == "__main__":
    main()
