"""One Ray Data execution across many epochs of a worker's stream.

Each epoch used to be its own execution, and starting one (plan, first read, first augment
tasks) costs about 2 s however small the set: on a set of a few hundred images that is
most of an epoch. Here one dataset reads a worker's streams of consecutive epochs, one
after the other (reader.read_rows(epochs=K): the same shard order, shuffle windows and
augmentation seeds per epoch as one execution per epoch), and `RunStream` cuts it back
into epochs: each epoch's batches start at its first row, and an epoch's rows that do not
fill a last batch, or that its steps do not reach, are dropped, as when each epoch was its
own stream. Pipelining crosses the epoch boundary, so the next epoch's first batches are
made while the current one's last steps train.

An execution covers at most MAX_ITEMS read items (shuffle windows), so a large set still
starts one per epoch and a small one runs hundreds of epochs in one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import ray.data

from raysl.data.ahead import Started

MAX_ITEMS = 2048


def epochs_per_execution(windows: int, epochs_left: int) -> int:
    """Epochs one execution reads: as many as fit MAX_ITEMS read items, at least one."""
    return max(1, min(epochs_left, MAX_ITEMS // max(1, windows)))


def _rows(block: dict, lo: int, hi: int) -> dict:
    return {k: v[lo:hi] for k, v in block.items()}


class RunStream:
    """Batches of `batch_size` rows per epoch from a dataset of consecutive epochs (rows
    carry `epoch`, non-decreasing). Epochs are taken in order, each at most once."""

    def __init__(self, ds: ray.data.Dataset, *, first_epoch: int, epochs: int, start: int, batch_size: int):
        self.ds, self.batch_size = ds, batch_size
        self.first_epoch, self.last_epoch, self.start = first_epoch, first_epoch + epochs - 1, start
        self.taken = first_epoch - 1  # the latest epoch handed out
        self._blocks: Iterator[dict] | None = None
        self._pending: dict | None = None  # rows read past the epoch being taken

    def serves(self, epoch: int, start: int) -> bool:
        """Whether `epoch` from position `start` is still ahead in this stream."""
        return self.taken < epoch <= self.last_epoch and start == (self.start if epoch == self.first_epoch else 0)

    def open(self) -> None:
        """Start the execution now (its first block fetched in a background thread)."""
        if self._blocks is None:
            blocks = self.ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)
            self._blocks = Started(blocks)

    def epoch(self, epoch: int, start: int) -> EpochBatches:
        assert self.serves(epoch, start), (epoch, start, self.taken)
        self.taken = epoch
        return EpochBatches(self, epoch, start)

    def _next_rows(self, epoch: int) -> dict | None:
        """The next rows of `epoch` (a slice of a block), None once the epoch's rows are over;
        rows of earlier epochs are skipped, those of later ones kept for them."""
        self.open()
        assert self._blocks is not None
        while True:
            block, self._pending = self._pending, None
            block = block if block is not None else next(self._blocks, None)
            if block is None:
                return None  # the execution's last epoch is over
            epochs = block["epoch"]
            lo, hi = (int(i) for i in np.searchsorted(epochs, [epoch, epoch + 1]))
            if hi < len(epochs):
                self._pending = _rows(block, hi, len(epochs))
            if lo < hi:
                return _rows(block, lo, hi)
            if hi < len(epochs):
                return None  # the block starts a later epoch

    def batches(self, epoch: int) -> Iterator[dict]:
        """Batches of `epoch`: slices of a block where a batch lies inside one (no copy),
        joined where it spans blocks; a last part smaller than a batch is dropped."""
        size, have = self.batch_size, 0
        parts: list[dict] = []
        while True:
            rows = self._next_rows(epoch)
            if rows is None:
                return
            n, lo = len(rows["pos"]), 0
            while lo < n:
                if not parts and n - lo >= size:
                    yield _rows(rows, lo, lo + size)
                    lo += size
                    continue
                take = min(size - have, n - lo)
                parts.append(_rows(rows, lo, lo + take))
                have += take
                lo += take
                if have == size:
                    yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
                    parts, have = [], 0


class EpochBatches:
    """One epoch of a RunStream, as reader.ViewBatches is one epoch's own stream: `position`
    (rows of the epoch's stream consumed) and `skipped` (rows dropped as corrupt) follow
    the batches taken."""

    def __init__(self, run: RunStream, epoch: int, start: int):
        self.run, self.epoch, self.position, self.skipped = run, epoch, start, 0

    def open(self) -> None:
        self.run.open()

    def __iter__(self):
        for batch in self.run.batches(self.epoch):
            pos = batch["pos"]
            self.skipped += int(pos[-1] + 1 - self.position - len(pos))
            self.position = int(pos[-1]) + 1
            yield batch


class Streams:
    """A worker's epochs, each served by the execution already reading it when there is
    one, else by a new one covering `epochs_for(epoch)` epochs. `open_ds(epoch, start,
    epochs)` gives its dataset (reader.read_views(..., epochs=...))."""

    def __init__(
        self, open_ds: Callable[[int, int, int], ray.data.Dataset], epochs_for: Callable[[int], int], batch_size: int
    ):
        self.open_ds, self.epochs_for, self.batch_size = open_ds, epochs_for, batch_size
        self.run: RunStream | None = None  # the newest execution (an older one lives while its epoch is taken)

    def batches(self, epoch: int, start: int) -> EpochBatches:
        if self.run is None or not self.run.serves(epoch, start):
            epochs = self.epochs_for(epoch)
            ds = self.open_ds(epoch, start, epochs)
            self.run = RunStream(ds, first_epoch=epoch, epochs=epochs, start=start, batch_size=self.batch_size)
        return self.run.epoch(epoch, start)
