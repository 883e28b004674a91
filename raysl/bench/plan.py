"""`raysl bench plan`: what a shard set of N shards costs to describe and to plan, in the
current format (manifest.json + index.parquet, one permutation per epoch) against the
version 1 format (every shard in manifest.json, one permutation per rank) in the same run.

Only the manifest is simulated (no shard files): N shards of about --rows rows each.
"plan s" is what every process does when a run starts: read the manifest, then the steps
of every epoch. The baseline plans `--baseline-epochs` epochs (one takes about 15 s at
1 M shards and 1,024 workers) and its plan s is that time scaled to all epochs, marked
as such in the output.

`--sets K` (K > 1) also plans the same shards as a mixture of K sets of N/K shards with
weights 1..K (data.shards as a list, raysl.data.mixture): its "mixture" entry times what a
process does at a run's start for it (read K manifests, then the steps of every epoch:
one permutation per set per epoch, so about the cost of one set of N shards).
"""

from __future__ import annotations

import os
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from raysl.data import legacy, mixture, reader
from raysl.data.schema import MANIFEST, Manifest, read_manifest, write_manifest
from raysl.data.shard_index import INDEX, ShardIndex
from raysl.errors import UserError


def simulated_manifest(shards: int, rows: int, seed: int = 0) -> Manifest:
    counts = np.random.default_rng(seed).integers(max(1, rows * 9 // 10), rows + 1, shards)
    files = [f"shard-{i:07d}.parquet" for i in range(shards)]
    index = ShardIndex.from_columns(files, counts, counts * 100_000, [["web"]] * shards)
    total = int(counts.sum())
    return Manifest(
        shards=index, written=total, sources=["/data/web"], source_images={"web": total}, licenses={"cc-by-4.0": total}
    )


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def _bytes(directory: str, *names: str) -> int:
    return sum(os.path.getsize(os.path.join(directory, n)) for n in names)


def run_plan_bench(
    shards: int,
    workers: int,
    epochs: int,
    *,
    rows: int = 1000,
    batch_size: int = 256,
    seed: int = 0,
    baseline_epochs: int = 1,
    sets: int = 1,
) -> dict:
    if shards < workers:
        raise UserError(f"--shards {shards} is fewer than --workers {workers}: every worker needs a shard")
    if sets < 1 or shards // sets < workers:
        raise UserError(f"--sets {sets}: each set needs at least --workers {workers} shards of the --shards {shards}")
    if min(workers, epochs, rows, batch_size) < 1 or not 0 <= baseline_epochs <= epochs:
        raise UserError(
            "--workers, --epochs, --rows and --batch-size must be >= 1, and --baseline-epochs in [0, --epochs]"
        )
    manifest = simulated_manifest(shards, rows, seed)
    old = legacy.ManifestV1(
        shards=[{"file": f, "rows": int(r)} for f, r in zip(manifest.shards.files(), manifest.shards.rows)],
        written=manifest.written,
        sources=manifest.sources,
        licenses=manifest.licenses,
    )

    def plan(m: Manifest) -> list[int]:  # what raysl.train.steps.epoch_steps does, without a config
        return [
            reader.steps_per_epoch(m, batch_size=batch_size, seed=seed, epoch=e, world_size=workers)
            for e in range(epochs)
        ]

    with tempfile.TemporaryDirectory() as new_dir, tempfile.TemporaryDirectory() as old_dir:
        _, write_s = _timed(lambda: write_manifest(new_dir, manifest))
        _, read_s = _timed(lambda: read_manifest(new_dir))
        steps, plan_s = _timed(lambda: plan(read_manifest(new_dir)))
        current = {
            "manifest_bytes": _bytes(new_dir, MANIFEST, INDEX),
            "json_bytes": _bytes(new_dir, MANIFEST),
            "index_bytes": _bytes(new_dir, INDEX),
            "write_s": write_s,
            "read_s": read_s,
            "plan_s": plan_s,
        }

        _, old_write_s = _timed(lambda: legacy.write_v1(old_dir, old))
        old_read, old_read_s = _timed(lambda: legacy.read_v1(old_dir))
        old_steps, old_epochs_s = _timed(
            lambda: [
                legacy.steps_per_epoch_v1(old_read, batch_size=batch_size, seed=seed, epoch=e, world_size=workers)
                for e in range(baseline_epochs)
            ]
        )
        per_epoch = old_epochs_s / baseline_epochs if baseline_epochs else float("nan")
        baseline = {
            "manifest_bytes": _bytes(old_dir, MANIFEST),
            "write_s": old_write_s,
            "read_s": old_read_s,
            "plan_s": old_read_s + per_epoch * epochs,
            "plan_s_per_epoch": per_epoch,
            "plan_epochs_measured": baseline_epochs,
        }
        if old_steps != steps[:baseline_epochs]:
            raise RuntimeError(f"the baseline planned {old_steps} steps, the index {steps[:baseline_epochs]}")
        mixed = _mixture_plan(manifest, sets, new_dir, workers, epochs, batch_size, seed) if sets > 1 else None
    return {
        "shards": shards,
        "workers": workers,
        "epochs": epochs,
        "rows_per_shard": rows,
        "batch_size": batch_size,
        "index": current,
        "baseline_v1": baseline,
        "steps_per_epoch": steps,
        "plan_speedup": baseline["plan_s"] / plan_s,
        "bytes_ratio": baseline["manifest_bytes"] / current["manifest_bytes"],
    } | ({"mixture": mixed} if mixed else {})


def _mixture_plan(manifest: Manifest, sets: int, root: str, workers: int, epochs: int, batch_size: int, seed: int):
    """The same shards as `sets` sets (contiguous slices) with weights 1..sets, planned as a
    mixture: read every set's manifest, then the steps of every epoch."""
    table, bounds = manifest.shards.table, [len(manifest.shards) * k // sets for k in range(sets + 1)]
    dirs = [os.path.join(root, f"set{k}") for k in range(sets)]
    for k, d in enumerate(dirs):
        os.makedirs(d)
        part = ShardIndex(table.slice(bounds[k], bounds[k + 1] - bounds[k]))
        write_manifest(d, Manifest(shards=part, written=int(part.rows.sum())))
    data = SimpleNamespace(shards=dirs, weights=[float(k + 1) for k in range(sets)])

    def plan() -> list[int]:
        mix = mixture.from_config(data)
        return [
            mix.steps_per_epoch(batch_size=batch_size, seed=seed, epoch=e, world_size=workers) for e in range(epochs)
        ]

    steps, plan_s = _timed(plan)
    return {"sets": sets, "weights": data.weights, "plan_s": plan_s, "steps_per_epoch": steps}


def add_arguments(p) -> None:
    p.add_argument("--shards", type=int, default=1_000_000, help="shards of the simulated set (default 1,000,000)")
    p.add_argument("--workers", type=int, default=1024, help="training workers to plan for (default 1024)")
    p.add_argument("--epochs", type=int, default=100, help="epochs to plan (default 100)")
    p.add_argument("--rows", type=int, default=1000, help="about this many rows per simulated shard")
    p.add_argument("--batch-size", type=int, default=256, help="rows per worker per step")
    p.add_argument("--seed", type=int, default=0, help="seed of the shard sizes and the permutations (default 0)")
    p.add_argument(
        "--baseline-epochs",
        type=int,
        default=1,
        help="epochs the version 1 baseline plans for real (its plan_s scales them to --epochs)",
    )
    p.add_argument("--sets", type=int, default=1, help="also plan the shards as a mixture of this many sets")


def run_from_args(a) -> dict:
    return run_plan_bench(
        a.shards,
        a.workers,
        a.epochs,
        rows=a.rows,
        batch_size=a.batch_size,
        seed=a.seed,
        baseline_epochs=a.baseline_epochs,
        sets=a.sets,
    )
