"""Linear probe on frozen features: features are extracted once, standardised with the
train set's mean/std, then one linear head per learning rate of the sweep is trained at
the same time (SGD, momentum 0.9, cosine schedule) through a DeepSpeed engine, data-
parallel over the Ray Train workers. The head with the best val top-1 is reported, with
the whole sweep (as DINO's eval_linear: the lr is chosen on the val set)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from raysl.eval.supervised import accuracy, engine_config, epoch_batches, per_worker_batch
from raysl.optim.schedules import apply, cosine
from raysl.train.engine import initialize

DEFAULT_LRS = (0.01, 0.1, 1.0)


class Heads(torch.nn.Module):
    """One linear classifier per swept lr, over the same standardised features."""

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, dim: int, classes: int, n: int, mean: torch.Tensor, std: torch.Tensor):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(dim, classes) for _ in range(n))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (heads, N, classes)
        x = (feats - self.mean) / self.std
        return torch.stack([h(x) for h in self.heads])


def linear_probe(
    train_f,
    train_y,
    val_f,
    val_y,
    *,
    lrs=DEFAULT_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> dict:
    torch.manual_seed(seed)  # the same initial heads on every worker
    classes = int(max(train_y.max(), val_y.max())) + 1
    model = Heads(train_f.shape[1], classes, len(lrs), train_f.mean(0), train_f.std(0) + 1e-6)
    groups = [{"params": list(h.parameters()), "lr_scale": lr} for h, lr in zip(model.heads, lrs)]
    optimizer = torch.optim.SGD(groups, lr=1.0, momentum=0.9, weight_decay=weight_decay)
    bs = per_worker_batch(len(train_y), batch_size)
    engine = initialize(model, optimizer, engine_config(bs))
    device = next(model.parameters()).device  # where DeepSpeed put the heads
    train_f, val_f = train_f.to(device), val_f.to(device)
    steps_per_epoch = len(epoch_batches(len(train_y), bs, seed=seed, epoch=0))
    schedule = cosine(1.0, 0.0, epochs * steps_per_epoch)  # times each group's lr
    step = 0
    for epoch in range(epochs):
        for idx in epoch_batches(len(train_y), bs, seed=seed, epoch=epoch):
            apply(optimizer, {"lr": float(schedule[step])})
            logits = engine(train_f[idx])
            loss = sum(F.cross_entropy(lg, train_y[idx].to(device)) for lg in logits)
            engine.backward(loss)
            engine.step()
            step += 1
    model.eval()
    sweep = {str(lr): accuracy(lambda i, h=h: model(val_f[i])[h], len(val_y), val_y) for h, lr in enumerate(lrs)}
    best = max(sweep, key=sweep.__getitem__)
    return {"top1": sweep[best], "best_lr": float(best), "sweep": sweep, "epochs": epochs, "steps": step}
