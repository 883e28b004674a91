"""How many steps a run takes: per epoch, in all, and on the held-out set, planned from
the shard set's index in one pass per epoch (`raysl bench plan` measures it at 1 M shards)."""

from __future__ import annotations

from raysl.config import Config
from raysl.data import mixture, reader
from raysl.data.schema import read_manifest


def rows_per_step(cfg: Config) -> int:
    """Images one worker trains on per optimizer step: data.batch_size x deepspeed.grad_accum."""
    return cfg.data.batch_size * cfg.deepspeed.grad_accum


def global_batch(cfg: Config, world_size: int) -> int:
    """Images per optimizer step over all `world_size` workers (the lr is scaled to it)."""
    return rows_per_step(cfg) * world_size


def epoch_steps(
    cfg: Config,
    world_size: int,
    epochs: int,
    pins: dict | None = None,
    *,
    sets: mixture.Mixture | None = None,
    rows: int | None = None,
    first: int = 0,
    done: int = 0,
) -> list[int]:
    """Steps of each epoch, planned only as far as the run goes: with train.max_steps, up to
    the epoch where the steps reach it. One permutation of the shards per epoch planned
    (about 25 ms at 1 M shards: 2.5 s for 100 epochs without max_steps, `raysl bench plan`);
    a mixture permutes each of its sets. `pins`: the index file of each set (mixture.pin);
    `sets`: the sets already read (their indexes are not read again). `rows`: images per
    worker and step (default rows_per_step); `first`, `done`: plan epochs from `first` on,
    `done` steps already taken before it (a resumed run)."""
    sets = sets if sets is not None else mixture.from_config(cfg.data, pins)
    rows = rows or rows_per_step(cfg)
    steps: list[int] = []
    for e in range(first, epochs):
        if cfg.train.max_steps and done + sum(steps) >= cfg.train.max_steps:
            break
        steps.append(sets.steps_per_epoch(batch_size=rows, seed=cfg.train.seed, epoch=e, world_size=world_size))
    return steps


def val_steps(cfg: Config, world_size: int) -> int:
    """Batches of the held-out set each worker scores for val_loss (0: the set is too small)."""
    manifest = read_manifest(cfg.eval.val_shards)
    n = reader.steps_per_epoch(
        manifest, batch_size=cfg.data.batch_size, seed=cfg.train.seed, epoch=0, world_size=world_size
    )
    return min(n, cfg.eval.val_batches)


def total_steps(cfg: Config, world_size: int, *, sets: mixture.Mixture | None = None) -> int:
    n = sum(epoch_steps(cfg, world_size, cfg.train.epochs, sets=sets))
    return min(n, cfg.train.max_steps) if cfg.train.max_steps else n
