"""Ray Datasets over a shard set: a deterministic, resumable stream per training worker.

Why not one dataset split with `streaming_split`: its coordinator hands blocks to
whichever worker asks first, so which image lands on which worker changes from run
to run and a resumed run cannot replay the same stream. Instead each epoch has a
seeded plan: the shard order is permuted by (seed, epoch), worker `rank` takes every
`world_size`-th shard of it, and rows are shuffled within windows of `window`
consecutive shards (the local shuffle buffer). A worker's stream is then a pure
function of (seed, epoch, rank, world_size), every row carries its position `pos` in
that stream, and resuming at a saved position skips whole shards and rows *before*
any image is decoded. A run resumed on another number of workers reads the streams
of the worker count its epoch started with, each worker only its rows of them
(`keep`, raysl.data.plan), also filtered before decode. Reading and augmenting still
run as Ray Data tasks, so they can live on CPU-only nodes.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from raysl.data.ahead import Started
from raysl.data.schema import Manifest, read_manifest, read_shard, shard_paths
from raysl.data.shard_index import select_rows
from raysl.errors import UserError

READ_COLUMNS = ["key", "image", "label"]


def shard_order(manifest: Manifest, *, seed: int, epoch: int, world_size: int) -> np.ndarray:
    """The epoch's shard order (one permutation for all ranks): rank r reads order[r::world_size].
    Costs one permutation of the shard count: 12-23 ms at 1 M shards (2-core CPU machine)."""
    n = len(manifest.shards)
    if n < world_size:
        raise UserError(
            f"the shard set has {n} shard(s) for {world_size} workers; every worker needs at "
            "least one: rebuild with a smaller --shard-size or use fewer workers"
        )
    return np.random.default_rng([seed, epoch]).permutation(n)


def worker_shards(manifest: Manifest, *, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """Indices (into manifest.shards) that worker `rank` reads in `epoch`, in reading order."""
    return shard_order(manifest, seed=seed, epoch=epoch, world_size=world_size)[rank::world_size].tolist()


def rows_per_worker(manifest: Manifest, *, seed: int, epoch: int, world_size: int) -> list[int]:
    """Rows each rank reads in `epoch`, from one permutation: the rows in shard order, padded
    with zeros to whole rounds of `world_size`, summed per column (column = rank)."""
    rows = manifest.shards.rows[shard_order(manifest, seed=seed, epoch=epoch, world_size=world_size)]
    rows = np.concatenate([rows, np.zeros(-len(rows) % world_size, rows.dtype)])
    return rows.reshape(-1, world_size).sum(axis=0).tolist()


def steps_per_epoch(manifest: Manifest, *, batch_size: int, seed: int, epoch: int, world_size: int) -> int:
    """Steps every worker can take in `epoch` (workers must agree, so the smallest share decides)."""
    return min(rows_per_worker(manifest, seed=seed, epoch=epoch, world_size=world_size)) // batch_size


def aug_seeds(keys: list[str], seed: int, epoch: int) -> np.ndarray:
    """One augmentation seed per image, from (seed, epoch, key): independent of which
    worker or process augments it."""
    return np.array(
        [np.random.SeedSequence([seed, epoch, zlib.crc32(k.encode())]).generate_state(1, np.uint32)[0] for k in keys],
        dtype=np.int64,
    )


def window_order(seed: int, epoch: int, window: int, rows: int) -> np.ndarray:
    """The order of the `rows` rows of a shuffle window (its shards' rows concatenated) in the stream."""
    return np.random.default_rng([seed, epoch, window]).permutation(rows)


def kept(pos: np.ndarray, start: int, keep: tuple[int, int, int]) -> np.ndarray:
    """Which of the stream positions `pos` read_rows keeps with `keep` = (lo, hi, period):
    those whose offset from `start` modulo `period` is in [lo, hi)."""
    lo, hi, period = keep
    offset = (pos - start) % period
    return (offset >= lo) & (offset < hi)


def _read_shard(path: str, mask: bytes | None, cache: dict | None) -> pa.Table:
    """The set's rows of one shard file: from the object store when the set is cached
    (data.cache: whole files, read once), else from storage."""
    if cache and path in cache:
        return select_rows(ray.get(cache[path]), mask)
    return read_shard(path, mask, READ_COLUMNS)


def _read_window(item: dict, cache: dict | None = None) -> pa.Table:
    """Read the shards of one shuffle window, shuffle their rows, drop what was consumed."""
    table = pa.concat_tables([_read_shard(p, m, cache) for p, m in zip(item["paths"], item["masks"])])
    order = window_order(item["seed"], item["epoch"], item["window"], table.num_rows)[item["skip"] :]
    pos = np.arange(item["skip"], item["skip"] + len(order)) + item["first_pos"]
    if item["keep_period"]:  # this worker's rows of each step only (data.plan), dropped before decode
        mine = kept(pos, item["start"], (int(item["keep_lo"]), int(item["keep_hi"]), int(item["keep_period"])))
        order, pos = order[mine], pos[mine]
    table = table.take(pa.array(order))
    keys = table.column("key").to_pylist()
    labels = table.column("label").fill_null(-1)
    return pa.table(
        {
            "key": table.column("key"),
            "image": table.column("image"),
            "label": labels,
            "pos": pa.array(pos, pa.int64()),
            "aug_seed": pa.array(aug_seeds(keys, item["seed"], item["epoch"])),
            "epoch": pa.array(np.full(len(keys), item["epoch"], np.int64)),
        }
    )


def _read_windows(batch: dict, cache: dict | None = None) -> pa.Table:
    items = [dict(zip(batch.keys(), values)) for values in zip(*batch.values())]
    return pa.concat_tables([_read_window(item, cache) for item in items])


def _epoch_items(manifest, shards, items, seed, epoch, rank, world_size, window, start, keep) -> int:
    """Append the read items (shuffle windows) of worker `rank`'s stream of `epoch` from
    position `start` to `items`; returns the stream's rows in the epoch."""
    mine = worker_shards(manifest, seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    paths = shard_paths(shards, manifest, mine)  # in reading order
    counts = manifest.shards.rows[mine].tolist()
    masks = manifest.shards.masks(mine)  # a selection keeps only some rows of each file
    first_pos = 0
    for w in range(0, len(mine), window):
        rows = sum(counts[w : w + window])
        skip = min(max(start - first_pos, 0), rows)
        if skip < rows:
            items.append(
                {
                    "paths": paths[w : w + window],
                    "masks": masks[w : w + window],
                    "window": w,
                    "skip": skip,
                    "first_pos": first_pos,
                    "seed": seed,
                    "epoch": epoch,
                    "start": start,  # Ray Data's numpy batches: ints, no None
                    **dict(zip(("keep_lo", "keep_hi", "keep_period"), keep or (0, 0, 0))),
                }
            )
        first_pos += rows
    return first_pos


def windows_per_epoch(manifest: Manifest, *, world_size: int, window: int) -> int:
    """Read items (shuffle windows) of the longest worker stream of an epoch."""
    return math.ceil(math.ceil(len(manifest.shards) / world_size) / window)


def read_rows(
    shards: str,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    window: int = 2,
    num_cpus: float = 1.0,
    resources: dict | None = None,
    index: str | None = None,
    concurrency: int | None = None,
    keep: tuple[int, int, int] | None = None,
    epochs: int = 1,
    cache: dict | None = None,
) -> ray.data.Dataset:
    """Rows (key, image bytes, label, pos, aug_seed, epoch) of worker `rank`'s stream for
    `epoch`, starting at position `start` (rows of this stream already consumed), followed
    by its streams of the next `epochs - 1` epochs from their start, in one dataset (`pos`
    counts from 0 in each epoch). `index`: the
    set's index file to read (one a run pinned, see mixture); None: the current one.
    `concurrency`: at most that many read tasks at once (None: as many as Ray runs).
    `keep` = (lo, hi, period): only the rows whose offset from `start` modulo `period` is
    in [lo, hi) (a worker's part of each step of an epoch resumed at another worker
    count, raysl.data.plan). `cache`: shard path -> object ref of its table
    (data.cache.put_set), read from there instead of from storage."""
    if window < 1:
        raise UserError(f"shuffle window must be >= 1 shard, got {window}")
    manifest = read_manifest(shards, index)
    items: list[dict] = []
    for e in range(epoch, epoch + epochs):
        first = e == epoch
        rows = _epoch_items(
            manifest, shards, items, seed, e, rank, world_size, window, start if first else 0, keep if first else None
        )
        if first and rows <= start:
            raise UserError(f"start position {start} is past the end of epoch {epoch} ({rows} rows for worker {rank})")
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _read_windows,  # type: ignore[arg-type]  # Ray's type for fn leaves out fn_kwargs
        fn_kwargs={"cache": cache},
        batch_size=1,
        batch_format="numpy",
        # Each concurrent task holds a worker process, and each worker process imports the
        # views' dependencies once (1-2 s of CPU): unbounded on 2 cores, an epoch of 5
        # windows started 8 of them. Never above the window count (Ray Data warns).
        compute=ray.data.TaskPoolStrategy(size=min(concurrency, len(items))) if concurrency else None,
        num_cpus=num_cpus,
        resources=resources or None,
    )
    ds.context.execution_options.preserve_order = True  # the stream order is part of the contract
    return ds


def _augment(batch: dict, spec) -> dict:
    from raysl.data.views import ViewTransform

    return ViewTransform(spec)(batch)


def _decode(batch: dict, spec) -> dict:
    from raysl.data.decode import PixelTransform

    return PixelTransform(spec)(batch)


MAX_BLOCK_BYTES = 64 << 20
MAX_BATCHES_PER_BLOCK = 8


def block_rows(spec, batch_size: int, pixels: bool = False) -> int:
    """Rows per augment task for training batches of `batch_size`: whole batches, as many
    as fit in MAX_BLOCK_BYTES of uint8 views, at most MAX_BATCHES_PER_BLOCK (a batch larger
    than MAX_BLOCK_BYTES: as many rows as fit). Each block costs its task and the
    consumer's Ray Data iterator about the same whatever its size, and the training worker
    runs that iterator beside its step (224 px SimCLR views read in batches of 32: 20.5 ms
    of the consumer's CPU per batch in blocks of 32 rows, 5.6 ms in blocks of 128). The
    batch cap keeps small views (32 px: 6 KB a row) from making a shuffle window one
    block, which one task would augment alone while the first batch waits for all of it.
    `pixels`: blocks of decoded images (read_views(pixels_only=True)), sized as images of
    the smallest side they decode to (spec.min_decode_side()), or as the views if larger."""
    row = sum(3 * c.size * c.size for c in spec.per_view())
    if pixels:
        row = max(row, 3 * spec.min_decode_side() ** 2)
    if batch_size * row > MAX_BLOCK_BYTES:
        return max(1, MAX_BLOCK_BYTES // row)
    return batch_size * min(MAX_BATCHES_PER_BLOCK, MAX_BLOCK_BYTES // (batch_size * row))


def read_views(
    shards: str,
    spec,
    *,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
    window: int = 2,
    concurrency: int | None = None,
    batch_size: int = 32,
    num_cpus: float = 1.0,
    resources: dict | None = None,
    index: str | None = None,
    pixels_only: bool = False,
    keep: tuple[int, int, int] | None = None,
    epochs: int = 1,
    cache: dict | None = None,
) -> ray.data.Dataset:
    """read_rows + decode + augment into the views of `spec` (a view_plans.ViewSpec) as Ray Data tasks.
    Rows whose image does not decode are dropped there; `pos` shows the gap. `pixels_only`:
    the tasks decode and stop there (decode.PixelTransform), for views made on the
    training worker's device. `keep`, `epochs`, `cache`: see read_rows.

    `num_cpus` is what each task reserves. Training workers that hold every CPU of a
    machine leave nothing for tasks that reserve one, so single-machine training uses
    0 (the tasks then share the workers' cores) with a bounded `concurrency`. `resources`
    (custom Ray resources, e.g. {"data_node": 1}) pins the tasks to the nodes that have them.
    `batch_size`: rows per augment task (training uses `block_rows`)."""
    ds = read_rows(
        shards,
        seed=seed,
        epoch=epoch,
        rank=rank,
        world_size=world_size,
        start=start,
        window=window,
        num_cpus=num_cpus,
        resources=resources,
        index=index,
        # From the object store a read is a slice of tables already there (milliseconds per
        # window): one task keeps the augment tasks fed, and each further one would hold a
        # worker process of its own that imports the views' dependencies (1-2 s of CPU).
        concurrency=1 if cache else concurrency,
        keep=keep,
        epochs=epochs,
        cache=cache,
    )
    # A window's rows leave the read task as one block, and Ray Data gives a whole block
    # to one task: split it into blocks of one augment batch (fused into the read task,
    # order kept) so up to `concurrency` tasks augment a window's rows side by side.
    ds = ds.repartition(target_num_rows_per_block=batch_size)
    # Ray Data fuses the split into the read task only when both reserve the same resources
    # and take the same task bound; unfused, the split would be a task of 1 CPU, which never
    # runs while training workers hold every CPU (num_cpus=0). Give it the read task's own.
    # The plan's root is the split, a map operator; Ray types it as any logical operator.
    split: Any = ds._logical_plan.dag
    split.ray_remote_args.update(num_cpus=num_cpus, **({"resources": resources} if resources else {}))
    object.__setattr__(split, "compute", split.input_dependencies[0].compute)
    return ds.map_batches(
        _decode if pixels_only else _augment,  # type: ignore[arg-type]  # Ray's type for fn leaves out fn_kwargs
        fn_kwargs={"spec": spec},
        batch_size=batch_size,
        batch_format="numpy",
        compute=ray.data.TaskPoolStrategy(size=concurrency) if concurrency else None,
        num_cpus=num_cpus,
        resources=resources or None,
    )


# Ray Data's executor runs in the process that iterates, and each of its loops waits up to
# 0.1 s for *all* its running tasks before it takes a finished one's output and submits the
# next (ray-project/ray#42377, #45934). With 2 augment tasks each then sits idle for about
# a third of its time, waiting for the other to finish. Ray 2.60 has no setting for it: set
# where the executor reads it.
TASK_WAIT_S = 0.01


def quick_task_turnaround() -> None:
    """Ray Data's wait for finished tasks in this process: at most TASK_WAIT_S."""
    from ray.data._internal.execution import streaming_executor_state as executor

    if hasattr(executor, "WAIT_FOR_TASK_COMPLETION_TIMEOUT_S"):  # a later Ray may drop it
        executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = min(executor.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S, TASK_WAIT_S)


class ViewBatches:
    """Fixed-shape batches from a view dataset, counting images skipped as corrupt and
    tracking the position to resume from. The arrays may be read-only (Ray Data's own
    memory): numpy refuses writes to them; views.block_tensor makes tensors of them."""

    def __init__(self, ds: ray.data.Dataset, *, batch_size: int, start: int = 0, prefetch_batches: int = 2):
        quick_task_turnaround()
        self.ds = ds
        self.batch_size = batch_size
        self.position = start  # rows of the stream consumed so far
        self.skipped = 0
        self.prefetch_batches = prefetch_batches
        self._opened: Started | None = None

    def _rows(self):
        return self.ds.iter_batches(
            batch_size=self.batch_size, drop_last=True, batch_format="numpy", prefetch_batches=self.prefetch_batches
        )

    def open(self) -> None:
        """Start the pipeline now (its first batch in a background thread), ahead of the
        iteration; position and skipped change only as batches are taken."""
        if self._opened is None:
            self._opened = Started(self._rows())

    def __iter__(self):
        rows, self._opened = self._opened or self._rows(), None
        for batch in rows:
            pos = batch["pos"]
            # positions are consecutive except where a corrupt image was dropped
            self.skipped += int(pos[-1] + 1 - self.position - len(pos))
            self.position = int(pos[-1]) + 1
            yield batch  # often read-only slices of Ray Data's blocks: views.block_tensor
