"""Collectives for losses that need the whole global batch.

Convention (what makes the losses in `losses.py` distributed-correct): every worker
computes a local loss whose mean over workers is the loss of the global batch, and
DDP/DeepSpeed averages the gradients over workers. For that, a collective that carries
gradients must send back to each owner the SUM of the gradients every worker computed
for its copy; `gather_with_grad` and `all_reduce_sum_with_grad` do exactly that. The
`*_no_grad` / plain reductions return detached results (statistics, assignments, keys).

All of them are the identity (no process group needed) when torch.distributed is not
initialised, and assume tensors of the same shape on every worker.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # every worker's gradient for every slice, summed
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceSumWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # d(sum)/d(x_w) = 1 for every worker's copy of the sum
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0 (worker-major); gradients flow back to
    each owner, summed over the workers that used it."""
    if world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


def all_reduce_sum_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over workers; gradients flow back to every worker's `x`, summed over the
    workers that used the sum."""
    if world()[1] == 1:
        return x
    return _AllReduceSumWithGrad.apply(x.contiguous())


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every worker along dim 0 (worker-major), detached."""
    x = x.detach()
    _, size = world()
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over workers, as a new detached tensor (`x` is left untouched)."""
    x = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(x)
    return x


@torch.no_grad()
def all_reduce_max(x: torch.Tensor) -> torch.Tensor:
    """Element-wise max of `x` over workers, as a new detached tensor."""
    x = x.detach().clone()
    if world()[1] > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x
