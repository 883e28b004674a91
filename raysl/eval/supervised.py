"""The Ray Train side shared by the linear probe and fine-tuning: a DeepSpeed engine
(`raysl.train.engine.initialize`, ZeRO-0 fp32 unless told), a seeded data-parallel
batch plan, and accuracy summed over workers."""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from raysl.config import Config, from_dict


def world() -> tuple[int, int]:
    """(rank, world size) of the process group Ray Train set up, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def engine_config(batch_size: int, zero_stage: int = 0, precision: str = "fp32", clip_grad: float = 0.0) -> Config:
    """The Config an evaluation engine is built from (only batch, ZeRO, precision and clipping matter)."""
    return from_dict(
        {
            "data": {"batch_size": batch_size},
            "deepspeed": {"zero_stage": zero_stage, "precision": precision},
            "optim": {"clip_grad": clip_grad},
        },
        origin="eval engine",
    )


def per_worker_batch(n: int, batch_size: int, *, even: bool = False) -> int:
    """The per-worker batch: `batch_size`, or less where each worker's share of `n` is smaller."""
    _, size = world()
    b = max(1, min(batch_size, n // size))
    if even:  # mixup/cutmix pair images within a batch
        b = max(2, b - b % 2)
    return b


def epoch_batches(n: int, batch_size: int, *, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of this worker for one epoch: one seeded permutation shared by all
    workers, worker r takes every world-th index, the same number of full batches each."""
    rank, size = world()
    order = torch.from_numpy(np.random.default_rng([seed, epoch]).permutation(n))
    mine = order[rank::size]
    steps = (n // size) // batch_size
    return [mine[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


@torch.no_grad()
def accuracy(predict, n: int, labels: torch.Tensor, batch_size: int = 256) -> float:
    """Top-1 in percent of `predict(indices) -> logits` over n examples, split across workers."""
    rank, size = world()
    mine = torch.arange(n)[rank::size]
    correct = torch.zeros(1, dtype=torch.float64)
    for i in range(0, len(mine), batch_size):
        idx = mine[i : i + batch_size]
        correct += (predict(idx).argmax(-1).cpu() == labels[idx]).sum()
    if size > 1:
        dist.all_reduce(correct)
    return 100.0 * float(correct) / n
