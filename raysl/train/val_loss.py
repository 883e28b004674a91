"""The held-out SSL loss (`val_loss`): the method's own loss on views of images it never
trains on, without touching training. Queues, centers and BatchNorm statistics are
buffers, restored after the forward passes; the RNG state is restored too, so a run with
validation trains exactly as one without."""

from __future__ import annotations

import torch
import torch.distributed as dist

from raysl.train.batch import forward
from raysl.train.callback import Callback


@torch.no_grad()
def held_out_loss(engine, method: torch.nn.Module, batches, values: dict) -> float:
    """Mean loss over `batches` (each a Batch or a list of normalised views), averaged over workers.
    Every worker must call it (the forward passes and the average are collective)."""
    saved = {k: b.clone() for k, b in method.named_buffers()}
    rng = torch.get_rng_state()
    total, n = 0.0, 0
    try:
        for batch in batches:
            total += float(forward(engine, batch, values)["loss"].float())
            n += 1
    finally:
        for k, b in method.named_buffers():
            b.copy_(saved[k])
        torch.set_rng_state(rng)
    t = torch.tensor([total, float(n)], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(t)
    return float(t[0] / t[1]) if t[1] else float("nan")


class ValLoss(Callback):
    """`val_loss` in the metrics every eval.val_every steps and at the last step."""

    def on_step(self, trainer, out: dict, metrics: dict) -> None:
        step, every = trainer.state["step"], trainer.cfg.eval.val_every
        if step % every == 0 or step == trainer.total:
            metrics["val_loss"] = held_out_loss(trainer.engine, trainer.method, trainer.val_batches(), trainer.values)
