"""Collectives that keep gradients, for losses that need the whole global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0; gradients flow back to each owner
    (all_gather's backward sums the gradients of every worker's copy)."""
    _, size = world()
    if size == 1:
        return x
    return torch.cat(dist_fn.all_gather(x), dim=0)
