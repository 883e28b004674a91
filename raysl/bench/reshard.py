"""`raysl bench reshard`: what resuming a checkpoint at another number of workers costs a
new worker.

A ZeRO-2 AdamW8bit checkpoint of `--numel` parameters (default 304 M, a ViT-L's; two
param groups as a ViT's: nearly all decayed weights, a thousandth biases and norms)
written by `--old-workers` workers in DeepSpeed's format from real bitsandbytes AdamW8bit
state (one step on random gradients); then, for each of `--new-workers`, the seconds the
new worker that reads the most old files takes to restore its partition through
raysl.train.reshard's own code path: the file reads, the 8-bit state dequantised, the
cut, and the state quantised again with the optimizer's qmaps. The new worker's optimizer
is a stand-in for DeepSpeed's ZeRO-2 optimizer with the attributes the resharder reads:
building a DeepSpeed engine of that size would time the build, not the resharding.

Also the bytes of the old optimizer files each new worker reads, the bytes the recorded
layout adds to raysl_state.json, and a projection to a ViT-g (1.01 B parameters) at
1,024 -> 512 and 512 -> 1,024 workers: the old files and bytes each new worker reads, from
the layout, and seconds scaled from the measured seconds per million elements read.

Prints one JSON line."""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

TAG = "engine"
VIT_G = 1_010_000_000
PROJECTED = ((1024, 512), (512, 1024))


def groups_of(numel: int) -> list[int]:
    """A ViT's two param groups: nearly everything in the decayed weights."""
    return [numel - numel // 1000, numel // 1000]


def layout(numels: list[int]) -> dict:
    """What raysl.train.reshard.layout records in raysl_state.json for these ZeRO-2 groups
    at step 0 (built here, so a ViT-g's needs no 1 B-element stand-in)."""
    from raysl.train.reshard import COUNTERS

    return {
        "stage": 2,
        "counters": {key: 0 for key in COUNTERS},
        "groups": [{"extent": n, "base": n} for n in numels],
    }


def _partition(numels: list[int], world: int) -> int:
    """Elements of one worker's ZeRO-2 partitions of all groups (each group padded to 2 * world)."""
    from raysl.train.reshard import ALIGNMENT

    return sum(math.ceil(n / (ALIGNMENT * world)) * ALIGNMENT for n in numels)


def _file(directory: str, k: int) -> str:
    return os.path.join(directory, TAG, f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt")


def write_old(directory: str, numels: list[int], world: int) -> None:
    """Each of `world` workers' ZeRO-2 optimizer file, as DeepSpeed writes it, holding its
    fp32 partition and bitsandbytes AdamW8bit's state after one step."""
    import bitsandbytes.optim as bnb
    import torch
    from deepspeed.checkpoint import constants as c
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    from raysl.train.reshard import ALIGNMENT

    os.makedirs(os.path.join(directory, TAG), exist_ok=True)
    torch.manual_seed(0)
    for k in range(world):
        parts, paddings = [], []
        for n in numels:
            size = math.ceil(n / (ALIGNMENT * world)) * ALIGNMENT
            parts.append(torch.randn(size) * 0.02)
            paddings.append(size - max(0, min(size, n - k * size)))
        opt = bnb.AdamW8bit([{"params": [p]} for p in parts], lr=1e-3)
        for p in parts:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        sd = {
            c.LOSS_SCALER: LossScaler(1.0),
            "dynamic_loss_scale": False,
            "overflow": False,
            c.CLIP_GRAD: 1.0,
            c.BASE_OPTIMIZER_STATE: opt.state_dict(),
            c.SINGLE_PARTITION_OF_FP32_GROUPS: [p[: p.numel() - pad] for p, pad in zip(parts, paddings, strict=True)],
            c.GROUP_PADDINGS: paddings,
            c.PARAM_ALIGNMENT_PADDINGS: [[0] for _ in numels],
            c.PARTITION_COUNT: [world] * len(numels),
            c.DS_VERSION: "0.19.0",
        }
        torch.save({"optimizer_state_dict": sd}, _file(directory, k))
        del opt, parts, sd


class _NewZero2:
    """What raysl.train.reshard reads and calls of DeepSpeed's ZeRO-2 optimizer, for one
    worker of `world`."""

    def __init__(self, numels: list[int], world: int):
        import bitsandbytes.optim as bnb
        import torch

        from raysl.train.reshard import ALIGNMENT

        self.partition_size = [math.ceil(n / (ALIGNMENT * world)) * ALIGNMENT for n in numels]
        self.single_partition_of_fp32_groups = [torch.zeros(p) for p in self.partition_size]
        self.round_robin_bit16_meta = [[torch.empty(n, device="meta")] for n in numels]
        self.round_robin_bit16_padding = [[0] for _ in numels]
        self.optimizer = bnb.AdamW8bit([{"params": [p]} for p in self.single_partition_of_fp32_groups], lr=1e-3)
        self._hp_optimizer_states_linked = True

    def _load_global_state(self, sd):
        pass

    def _link_all_hp_params(self):
        pass

    def _lazy_init_hp_params_optimizer_state(self):
        pass


class _Engine:
    """The parts of DeepSpeed's engine raysl.train.reshard reads, at step 0."""

    global_steps = global_samples = skipped_steps = 0

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_optimization_stage(self) -> int:
        return 2

    def bfloat16_enabled(self) -> bool:
        return False


def reads(zero: dict, old: int, new: int) -> tuple[int, list[int]]:
    """The new worker that reads the most old optimizer files, and those old workers'
    ranks (its overlapping partitions and old worker 0's, read by every new worker)."""
    from raysl.train.reshard import old_ranks_for

    best, files = 0, [0]
    for rank in range(new):
        needed = sorted(old_ranks_for(zero, old, rank, new) | {0})
        if len(needed) > len(files):
            best, files = rank, needed
    return best, files


def _restore(directory: str, numels: list[int], old: int, new: int, rank: int) -> tuple[float, float]:
    """Seconds for worker `rank` of `new` to restore its partition from the old files: wall
    clock, and CPU time of this process (all its threads; what a busy machine does not stretch)."""
    from raysl.train.checkpoint import safe_load
    from raysl.train.reshard import _Zero12, _zero_files

    engine = _Engine(_NewZero2(numels, new))
    files = _zero_files(directory, TAG, engine, old, safe_load)
    t0, c0 = time.perf_counter(), time.process_time()
    _Zero12(directory, files, engine, old, rank, new).restore()
    return time.perf_counter() - t0, time.process_time() - c0


def run_reshard_bench(
    *, numel: int = 304_000_000, old_workers: int = 2, new_workers: tuple[int, ...] = (1,), directory: str | None = None
) -> dict:
    import torch

    numels = groups_of(numel)
    zero = layout(numels)
    own = directory is None
    root = directory or tempfile.mkdtemp(prefix="raysl_bench_reshard_")
    try:
        t0 = time.perf_counter()
        write_old(root, numels, old_workers)
        write_s = time.perf_counter() - t0
        sizes = [os.path.getsize(_file(root, k)) for k in range(old_workers)]
        seconds, cpu, read_bytes, read_elements, files_read = [], [], [], [], []
        for new in new_workers:
            rank, old_ranks = reads(zero, old_workers, new)
            wall, used = _restore(root, numels, old_workers, new, rank)
            seconds.append(round(wall, 2))
            cpu.append(round(used, 2))
            read_bytes.append(sum(sizes[k] for k in old_ranks))
            files_read.append(len(old_ranks))
            read_elements.append(len(old_ranks) * _partition(numels, old_workers))
    finally:
        if own:
            shutil.rmtree(root, ignore_errors=True)
    # the slowest measured rate, per million elements of old partitions read
    rate = max(s / (e / 1e6) for s, e in zip(seconds, read_elements, strict=True))
    bytes_per_param = sum(sizes) / numel
    projected = []
    for old, new in PROJECTED:
        g_numels = groups_of(VIT_G)
        _, old_ranks = reads(layout(g_numels), old, new)
        elements = len(old_ranks) * _partition(g_numels, old)
        projected.append(
            {
                "old_workers": old,
                "new_workers": new,
                "files_per_new_worker": len(old_ranks),
                "bytes_per_new_worker": round(elements * bytes_per_param),
                "reshard_s": round(rate * elements / 1e6, 2),
            }
        )
    return {
        "params": numel,
        "old_workers": old_workers,
        "new_workers": list(new_workers),
        "optimizer_bytes": sum(sizes),
        "write_s": round(write_s, 2),
        "reshard_s": seconds,
        "reshard_cpu_s": cpu,
        "files_read_per_new_worker": files_read,
        "bytes_read_per_new_worker": read_bytes,
        "s_per_million_elements_read": round(rate, 4),
        "extra_state_bytes": len(json.dumps(zero)),
        "threads": torch.get_num_threads(),
        "projected_vit_g": {
            "params": VIT_G,
            "basis": "projected: files and bytes from the layout, seconds from s_per_million_elements_read",
            "cases": projected,
        },
    }


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--numel", type=int, default=304_000_000, help="parameters of the checkpoint (default 304e6, a ViT-L)"
    )
    p.add_argument("--old-workers", type=int, default=2, help="workers that wrote the checkpoint (default 2)")
    p.add_argument(
        "--new-workers",
        type=int,
        nargs="+",
        default=[1],
        help="numbers of workers that resume it, each measured on its worker that reads the most (default 1)",
    )
    p.add_argument(
        "--dir", default=None, help="where to write the old checkpoint, kept after (default: a temporary folder)"
    )


def run_from_args(a) -> dict:
    if a.old_workers < 1 or any(n < 1 for n in a.new_workers) or a.numel < 1000:
        from raysl.errors import UserError

        raise UserError("--old-workers and --new-workers must be at least 1, --numel at least 1000")
    return run_reshard_bench(
        numel=a.numel, old_workers=a.old_workers, new_workers=tuple(a.new_workers), directory=a.dir
    )
