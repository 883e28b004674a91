"""Online kNN monitor: while pretraining runs, every `eval.knn_every` steps each worker
extracts the features of its share of a small labeled set, the shares are gathered over
the process group Ray Train set up, and a weighted cosine kNN (k = eval.knn_k, DINO's
protocol) scores the query half against the memory bank. The numbers go into the step's
metrics as knn_top1_k20, knn_top5_k20, knn_top1_k200, ... and knn_top1 (the first k).

The labeled set is loaded once per worker (decoded, eval-resized uint8). Under ZeRO-3 the
backbone's partitioned parameters are gathered layer by layer by DeepSpeed's forward hooks
as the features are extracted, as in training (tests/integration/test_zero3.py)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist

from raysl.config import Config
from raysl.eval.knn import extract_features, knn_top1
from raysl.eval.labeled import check_labeled, load_labeled
from raysl.train.callback import Callback


def gathered_features(
    backbone: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, progress: str | None = None
) -> torch.Tensor:
    """Features (N, D) of all `images`, in their order: worker r extracts rows r::world,
    then every worker gets every share (all_gather_object over the default group). The
    same as `extract_features(backbone, images)` in one process. `progress`: rank 0's
    progress bar of its share."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return extract_features(backbone, images, batch_size, progress=progress)
    rank, world = dist.get_rank(), dist.get_world_size()
    with _rank0_buffers(backbone):
        mine = extract_features(backbone, images[rank::world], batch_size, progress=progress if rank == 0 else None)
    shares: list = [None] * world
    dist.all_gather_object(shares, mine)
    dim = max(s.shape[1] for s in shares if s.numel())
    out = torch.empty(images.shape[0], dim)
    for r, share in enumerate(shares):
        if share.numel():
            out[r::world] = share
    return out


@contextmanager
def _rank0_buffers(module: torch.nn.Module):
    """Every worker extracts with rank 0's BatchNorm running statistics (DeepSpeed does not
    sync buffers, so each worker has its own; rank 0's are the ones its checkpoint saves),
    and gets its own back afterwards, so training is untouched."""
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    saved = [b.detach().clone() for b in buffers]
    for b in buffers:
        dist.broadcast(b.data, src=0)
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


def split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(memory-bank indices, query indices) of a seeded split, both sorted."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(max(1, int(round(n * val_fraction))), n - 1)
    return torch.from_numpy(np.sort(order[n_val:])), torch.from_numpy(np.sort(order[:n_val]))


def check_config(cfg: Config) -> None:
    """Before Ray starts: the monitor's shard sets are labeled and not empty."""
    if cfg.eval.knn_shards:
        n = check_labeled(cfg.eval.knn_shards, "eval.knn_shards")
        if cfg.eval.knn_val_shards:
            check_labeled(cfg.eval.knn_val_shards, "eval.knn_val_shards")
        elif n < 2:
            from raysl.errors import UserError

            raise UserError(
                f"eval.knn_shards {cfg.eval.knn_shards}: {n} image; the monitor splits it into a memory "
                "bank and queries, so it needs at least 2 (or set eval.knn_val_shards)"
            )


class KnnMonitor:
    def __init__(self, cfg: Config, image_size: int):
        e = cfg.eval
        self.every, self.ks, self.temperature, self.batch_size = (
            e.knn_every,
            list(e.knn_k),
            e.knn_temperature,
            e.knn_batch_size,
        )
        images, labels = load_labeled(e.knn_shards, image_size, "eval.knn_shards")
        if e.knn_val_shards:
            self.bank, self.bank_labels = images, labels
            self.query, self.query_labels = load_labeled(e.knn_val_shards, image_size, "eval.knn_val_shards")
        else:
            bank, query = split(len(labels), e.knn_val_fraction, cfg.train.seed)
            self.bank, self.bank_labels = images[bank], labels[bank]
            self.query, self.query_labels = images[query], labels[query]

    def due(self, step: int, total: int) -> bool:
        return step % self.every == 0 or step == total

    def evaluate(self, backbone: torch.nn.Module) -> dict[str, float]:
        """kNN metrics of the backbone now; every worker must call it (collective)."""
        bank = gathered_features(backbone, self.bank, self.batch_size)
        query = gathered_features(backbone, self.query, self.batch_size)
        return knn_metrics(bank, self.bank_labels, query, self.query_labels, self.ks, self.temperature)


def knn_metrics(bank, bank_labels, query, query_labels, ks: list[int], temperature: float) -> dict[str, float]:
    """{knn_top1_k{k}, knn_top5_k{k} for each k, knn_top1 (the first k)}; k above the bank size is clipped."""
    out = {}
    for k in ks:
        top1, top5 = knn_top1(bank, bank_labels, query, query_labels, k=k, temperature=temperature)
        out[f"knn_top1_k{k}"], out[f"knn_top5_k{k}"] = top1, top5
    out["knn_top1"] = out[f"knn_top1_k{ks[0]}"]
    return out


class KnnCallback(Callback):
    """The online kNN monitor plugged into the trainer: its metrics every eval.knn_every steps."""

    def setup(self, trainer) -> None:
        self.monitor = KnnMonitor(trainer.cfg, trainer.cfg.data.image_size or trainer.spec.crops[0].size)

    def on_step(self, trainer, out: dict, metrics: dict) -> None:
        if self.monitor.due(trainer.state["step"], trainer.total):
            metrics.update(self.monitor.evaluate(trainer.method.evaluated_backbone()))
