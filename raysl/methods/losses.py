"""Loss functions: pure, tested numerically against plain reference implementations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysl.methods.distributed import gather_with_grad, world


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalized-temperature cross entropy over the *global* batch.

    Each worker scores its own 2B anchors against all 2BW candidates gathered from
    every worker; the mean over workers of this local loss is the single-process loss
    of the whole batch, and its gradients match it after data-parallel averaging.
    """
    rank, size = world()
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1)  # rows: view-1 of B images, then view-2
    everything = gather_with_grad(local)  # (2B*W, d), worker-major
    logits = local @ everything.t() / temperature
    own = torch.arange(2 * b, device=z1.device) + rank * 2 * b
    logits[torch.arange(2 * b, device=z1.device), own] = float("-inf")  # never match yourself
    positive = own + torch.cat([torch.full((b,), b), torch.full((b,), -b)]).to(z1.device)
    return F.cross_entropy(logits.float(), positive)
