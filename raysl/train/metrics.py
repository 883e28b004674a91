"""Metrics on rank 0: a progress line, metrics.jsonl and TensorBoard events in the run dir."""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist


def say(line: str) -> None:
    """One line on the worker's stdout. Not `print`: Ray Train 2.60 patches print in its
    workers to both print and log the line, so every progress line reached the driver twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class MetricsLog:
    def __init__(self, run_dir: str, *, total_steps: int, resume_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._drop_after(resume_step)  # steps after the checkpoint are trained again
        self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=resume_step + 1)
        self.total = total_steps
        self.t0 = time.perf_counter()
        self.start_step = resume_step

    def _drop_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(keep)

    def log(self, metrics: dict, *, show: bool) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        step = metrics["step"]
        for k, v in metrics.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(k, v, step)
        if show:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / max(done, 1) * (self.total - step)
            say(
                f"step {step}/{self.total} epoch {metrics['epoch']} loss {metrics['loss']:.4f} "
                f"lr {metrics['lr']:.2e} {metrics['images_per_s']:.1f} img/s eta {_eta(eta)}",
            )

    def close(self) -> None:
        self.tb.close()


def read_metrics(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_curves(run_dir: str) -> list[str]:
    """loss.png and lr.png from metrics.jsonl; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    written = []
    for key in ("loss", "lr"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(*zip(*pts))
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        out = os.path.join(run_dir, f"{key}.png")
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


def global_metrics(
    out: dict,
    state: dict,
    skipped_now: int,
    values: dict,
    images_per_s: float,
    preempted: bool = False,
    drawn: dict | None = None,
) -> dict:
    """Losses and counters averaged/summed over workers, so every rank logs the same numbers.
    Only scalar outputs are metrics (methods may also return score tensors for histograms).
    `preempted` rides on the same all-reduce: `preempted_workers` counts the workers that
    received a preemption notice (present only when some did). `drawn` (a mixture's images
    put in batches per set, since the run began) is summed into `drawn/<set name>`."""
    scalars = {k: float(v.detach().float()) for k, v in out.items() if v.numel() == 1}
    names = sorted(scalars)
    sets = sorted(drawn or {})  # the same names on every worker (mixture.MixedBatches adds them all)
    t = torch.tensor(
        [scalars[k] for k in names]
        + [float((drawn or {})[k]) for k in sets]
        + [float(preempted), float(state["skipped"] + skipped_now)],
        dtype=torch.float64,
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
        **{f"drawn/{k}": int(t[len(names) + i]) for i, k in enumerate(sets)},
        **({"preempted_workers": int(t[-2])} if t[-2] else {}),
    }
