"""An epoch's data plan when the number of workers changes in the middle of it.

An epoch is planned with V streams, V the number of workers it started with: stream v
is reader.read_rows' stream of rank v of V, a pure function of (seed, epoch, v, V).
Every global step takes the same number of rows, `per_stream`, from every stream, so
where an epoch stands is world-size free: the rows consumed of each stream. A step's
global batch is the concatenation over v = 0 .. V-1 of stream v's next `per_stream`
rows (G = V * per_stream rows), and worker j of M takes positions [j*G/M, (j+1)*G/M)
of it. At M == V that is rank v reading stream v, as the epoch started; at another M a
worker reads only the streams its range meets, and keeps only its rows of them before
any image is decoded. With the global batch kept, every step trains on the images the
uninterrupted run would have; every remaining row of the epoch is read exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from raysl.data.mixture import StreamRows, concat_rows
from raysl.errors import UserError


@dataclass(frozen=True)
class Slice:
    """Worker's part of one stream in every step: offsets [lo, hi) of the stream's rows of the step."""

    stream: int
    lo: int
    hi: int


def worker_slices(streams: int, per_stream: int, workers: int, rank: int) -> list[Slice]:
    """Worker `rank`'s parts of a global step of `streams` x `per_stream` rows split over
    `workers` (who must divide it), in the order of the step's concatenation."""
    g = streams * per_stream
    if g % workers:
        raise ValueError(f"a global batch of {g} rows does not split over {workers} workers")
    lo, hi = rank * g // workers, (rank + 1) * g // workers
    out = []
    for v in range(lo // per_stream, math.ceil(hi / per_stream)):
        a, b = max(lo, v * per_stream) - v * per_stream, min(hi, (v + 1) * per_stream) - v * per_stream
        if b > a:
            out.append(Slice(v, a, b))
    return out


@dataclass(frozen=True)
class Batching:
    """How a step's global batch is trained at a worker count: `micro` rows per
    micro-batch, `accum` micro-batches per worker (DeepSpeed's gradient accumulation)."""

    workers: int
    micro: int
    accum: int

    @property
    def per_worker(self) -> int:
        return self.micro * self.accum

    @property
    def global_batch(self) -> int:
        return self.per_worker * self.workers


def keep_global_batch(global_batch: int, streams: int, workers: int, micro: int) -> Batching:
    """The largest global batch <= `global_batch` that `streams` streams give in equal parts
    and `workers` workers train as whole micro-batches of at most `micro` rows (the
    configured batch_size first; a smaller one only where it gives a larger global batch)."""
    best: Batching | None = None
    for m in range(micro, 0, -1):
        step = math.lcm(workers * m, streams)
        g = global_batch // step * step
        if g and (best is None or g > best.global_batch):
            best = Batching(workers, m, g // (workers * m))
    if best is None:
        raise UserError(
            f"a global batch of {global_batch} images cannot be split over {workers} workers and {streams} "
            f"data streams; resume with train.num_workers={streams}"
        )
    return best


def keep_worker_batch(streams: int, workers: int, micro: int, accum: int) -> Batching:
    """Each worker trains `accum` micro-batches of `micro` rows as configured; where the
    streams cannot give the global batch in equal parts, the nearest smaller one that fits."""
    wanted = Batching(workers, micro, accum)
    if wanted.global_batch % streams == 0:
        return wanted
    return keep_global_batch(wanted.global_batch, streams, workers, micro)


def steps_left(stream_rows: list[int], consumed: list[int], per_stream: int) -> int:
    """Whole steps the streams still give: the shortest one decides."""
    return min((n - c) // per_stream for n, c in zip(stream_rows, consumed))


class PlanBatches:
    """One worker's micro-batches of an epoch resumed at another worker count: for each
    step, its slice of each stream it reads (`open_stream(v, start, keep)` gives stream
    v's rows from `start`, only those whose offset in their step is in `keep` = (lo, hi,
    per_stream), as read_views does), concatenated in stream order and cut into micro-
    batches. The same interface as reader.ViewBatches: `skipped` counts rows whose image
    did not decode, each replaced by a repeat of another row of the worker's step."""

    def __init__(
        self,
        open_stream: Callable[[int, int, tuple[int, int, int]], object],
        *,
        slices: list[Slice],
        consumed: list[int],
        per_stream: int,
        micro: int,
    ):
        self.slices, self.consumed, self.per_stream, self.micro = slices, consumed, per_stream, micro
        self.rows = [
            StreamRows(
                # from the stream's position at the plan's start, which its step offsets count from
                lambda _, s=s: open_stream(s.stream, consumed[s.stream], (s.lo, s.hi, per_stream)),
                prefetch_batches=2,
                batch_size=micro,
            )
            for s in slices
        ]
        self.skipped = 0
        self.steps = 0  # steps taken

    def open(self) -> None:
        for rows, s in zip(self.rows, self.slices):
            rows.open(self.consumed[s.stream])

    def __iter__(self) -> Iterator[dict]:
        while True:
            parts, want = [], 0
            for rows, s in zip(self.rows, self.slices):
                first = self.consumed[s.stream] + self.steps * self.per_stream
                got = rows.take(first + s.lo, first + s.hi)
                want += s.hi - s.lo
                if got is not None:
                    parts.append(got)
            if not parts:
                return
            batch = {k: concat_rows([p[k] for p in parts]) for k in parts[0]}
            n = len(batch["pos"])
            self.skipped += want - n
            if n < want:  # images that did not decode: repeat rows of the step, keeping its shape
                batch = {k: v[np.arange(want) % n] for k, v in batch.items()}
            self.steps += 1
            for i in range(0, want, self.micro):
                yield {k: v[i : i + self.micro] for k, v in batch.items()}
