"""`raysl bench curate --scale N,...`: `raysl curate dedup` as tasks over parts on N synthetic
embeddings, with its time and memory per step, and its recall and precision on planted copies.

The embeddings: N random unit vectors (float16, `--scale-dim`), in parts of `--scale-part-rows`
rows, 5% of them near-copies (noise 0.05 per coordinate) of a vector in the previous part, so
copies and their originals sit in different parts; each key names its group (the original's
id). The source shard set is real (one shard of tiny rows per part), so the selection is
written as for any set. Generation and scoring are tasks too; each N runs in a fresh driver
process (its peak memory is the driver's), joined to the same Ray.

`--scale-single` also runs the in-memory SemDeDup as published (all embeddings in one
process, plain k-means on all of them, each image in its nearest cluster only) on the same
embeddings: the reference for recall, time and memory.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import resource
import sys
import time

import numpy as np
import pyarrow as pa

COPY_FRACTION = 0.05
NOISE = 0.05


def _base(seed: int, part: int, rows: int, dim: int) -> np.ndarray:
    return np.random.default_rng([seed, part]).standard_normal((rows, dim), dtype=np.float32)


def _planting(seed: int, part: int, rows: int, prev_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(copy positions in the first half of `part`, source positions in the second half of the part before)."""
    rng = np.random.default_rng([seed, part, 1])
    n = int(rows * COPY_FRACTION)
    at = rng.choice(rows // 2, n, replace=False)
    return at, prev_rows // 2 + rng.integers(0, prev_rows - prev_rows // 2, n)


def write_part(root: str, part: int, sizes: list[int], dim: int, seed: int, model: str) -> dict:
    """Shard `part` of the source set (tiny rows) and its embedding part with planted copies."""
    import pyarrow.parquet as pq

    from raysl.curate.embeddings import emb_schema, part_name
    from raysl.curate.parts import peak_rss
    from raysl.data.schema import SCHEMA

    rows, prev = sizes[part], (part - 1) % len(sizes)
    x = _base(seed, part, rows, dim)
    group = [f"{part:05d}-{i:07d}" for i in range(rows)]
    at, src = _planting(seed, part, rows, sizes[prev])
    noise = np.random.default_rng([seed, part, 2]).standard_normal((len(at), dim), dtype=np.float32)
    x[at] = _base(seed, prev, sizes[prev], dim)[src] + NOISE * noise
    for i, j in zip(at.tolist(), src.tolist()):
        group[i] = f"{prev:05d}-{j:07d}"
    keys = [f"v/{part:05d}-{i:07d}.g{g}" for i, g in enumerate(group)]
    const = lambda v, t: pa.array([v] * rows, t)  # noqa: E731
    shard = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "image": const(b"", pa.binary()),
            "sha256": const("", pa.string()),
            "width": const(1, pa.int32()),
            "height": const(1, pa.int32()),
            "format": const("png", pa.string()),
            "source": const("bench", pa.string()),
            "license": const("cc0-1.0", pa.string()),
            "attribution": const("", pa.string()),
            "label": pa.nulls(rows, pa.int64()),
        },
        schema=SCHEMA,
    )
    shard_file = os.path.join(root, "source", f"shard-{part:05d}.parquet")
    pq.write_table(shard, shard_file)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    emb = pa.table(
        {
            "key": pa.array(keys, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim),
            "shard": pa.array(np.full(rows, part, np.int32)),
            "row": pa.array(np.arange(rows, dtype=np.int64)),
        },
        schema=emb_schema(dim, model),
    )
    pq.write_table(emb, os.path.join(root, "emb", part_name(part)))
    return {"bytes": os.path.getsize(shard_file), "copies": len(at), "peak_rss": peak_rss()}


def make_embeddings(root: str, n: int, dim: int, part_rows: int, seed: int = 0) -> tuple[str, int]:
    """(EMB, planted copies) of `n` synthetic embeddings under `root`."""
    from raysl.curate.embeddings import META
    from raysl.curate.parts import map_tasks
    from raysl.data.schema import Manifest, write_manifest
    from raysl.data.shard_index import ShardIndex

    model = f"bench:random-unit,dim={dim},seed={seed}"
    sizes = [min(part_rows, n - lo) for lo in range(0, n, part_rows)]
    for d in ("source", "emb"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    calls = [(root, p, sizes, dim, seed, model) for p in range(len(sizes))]
    written = map_tasks(write_part, calls, f"bench curate: {n} embeddings")
    files = [f"shard-{p:05d}.parquet" for p in range(len(sizes))]
    manifest = Manifest(
        shards=ShardIndex.from_columns(files, sizes, [w["bytes"] for w in written], [["v"]] * len(sizes)),
        sources=["bench"],
    )
    manifest.written = n
    write_manifest(os.path.join(root, "source"), manifest)
    emb = os.path.join(root, "emb")
    with open(os.path.join(emb, META), "w") as f:
        json.dump({"shards": len(sizes), "source": os.path.join(root, "source"), "model": model, "image_size": 0}, f)
    return emb, sum(w["copies"] for w in written)


def _group(key: str) -> str:
    return key.rsplit(".g", 1)[1]


def score_part(uri: str) -> dict:
    """Planted copies of one lineage part, and its duplicate drops: right when the image it
    copies is of its own group."""
    import pyarrow.parquet as pq

    t = pq.read_table(uri, columns=["key", "reason", "duplicate_of"])
    keys, reasons, of = (t.column(c).to_pylist() for c in ("key", "reason", "duplicate_of"))
    planted = sum(_group(k) != k[2:].split(".g", 1)[0] for k in keys)
    dropped = [(k, o) for k, r, o in zip(keys, reasons, of) if r == "duplicate"]
    return {"planted": planted, "dropped": len(dropped), "correct": sum(_group(k) == _group(o) for k, o in dropped)}


def _scores(planted: int, dropped: int, correct: int) -> dict:
    return {"recall": round(correct / max(planted, 1), 4), "precision": round(correct / max(dropped, 1), 4)}


def _distributed(address: str, root: str, n: int, opts: dict, queue) -> None:
    """One N, in a fresh driver process joined to the bench's Ray."""
    import ray

    from raysl.curate.parts import join, map_tasks, part_name
    from raysl.curate.steps import run_dedup

    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    t = time.perf_counter()
    emb, planted = make_embeddings(root, n, opts["dim"], opts["part_rows"])
    generate_s = time.perf_counter() - t
    clusters = opts["clusters"] or max(1, n // 1000)
    out = os.path.join(root, "sel")
    t = time.perf_counter()
    curation = run_dedup(emb, out, clusters=clusters, sample=opts["sample"], threshold=opts["threshold"], **opts["kw"])
    seconds = time.perf_counter() - t
    lineage = [join(out, "lineage.parquet", part_name(p)) for p in range(len(os.listdir(join(out, "lineage.parquet"))))]
    scored = map_tasks(score_part, [(u,) for u in lineage], "bench curate: score")
    totals = {k: sum(s[k] for s in scored) for k in ("planted", "dropped", "correct")}
    assert totals["planted"] == planted
    phases = curation["phases"]
    queue.put(
        {
            "n": n,
            "dim": opts["dim"],
            "parts": len(lineage),
            "clusters": clusters,
            "coarse": curation["steps"][-1]["coarse"],
            "margin": opts["kw"]["margin"],
            "sample": opts["sample"],
            "seconds": round(seconds, 1),
            "peak_task_gib": round(max(p.get("peak_task_bytes", 0) for p in phases.values()) / 2**30, 3),
            "peak_driver_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            **_scores(**totals),
            "planted": planted,
            "dropped": totals["dropped"],
            "steps": {
                k: {"seconds": v["seconds"], "tasks": v.get("tasks", 1), "peak_task_gib": _gib(v)}
                for k, v in phases.items()
            },
            "generate_s": round(generate_s, 1),
        }
    )


def _gib(phase: dict) -> float | None:
    return round(phase["peak_task_bytes"] / 2**30, 3) if "peak_task_bytes" in phase else None


def _single(emb: str, n: int, opts: dict, queue) -> None:
    """The in-memory SemDeDup on the same embeddings, in a fresh process."""
    from raysl.curate import embeddings
    from raysl.curate.dedup import semdedup

    t = time.perf_counter()
    _, table, x = embeddings.load(emb)
    keys = table.column("key").to_pylist()
    del table
    clusters = opts["clusters"] or max(1, n // 1000)
    found = semdedup(x, clusters=clusters, threshold=opts["threshold"], iters=opts["kw"]["iters"], margin=0, coarse=1)
    seconds = time.perf_counter() - t
    hit = np.flatnonzero(found["duplicate_of"] >= 0)
    correct = sum(_group(keys[i]) == _group(keys[j]) for i, j in zip(hit, found["duplicate_of"][hit]))
    planted = sum(_group(k) != k[2:].split(".g", 1)[0] for k in keys)
    queue.put(
        {
            "seconds": round(seconds, 1),
            **found["seconds"],
            "peak_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3),
            **_scores(planted, len(hit), correct),
        }
    )


def _child(target, *args):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, queue))
    p.start()
    result = queue.get()
    p.join()
    return result


def bench_scale(work: str, args) -> list[dict]:
    """One row per N (printed as it is measured)."""
    import ray

    from raysl.runtime import init_ray

    init_ray(getattr(args, "address", None))
    address = ray.get_runtime_context().gcs_address
    opts = {
        "dim": args.scale_dim,
        "part_rows": args.scale_part_rows,
        "clusters": args.scale_clusters,
        "sample": args.scale_sample,
        "threshold": args.scale_threshold,
        "kw": {"iters": args.scale_iters, "margin": args.scale_margin, "coarse": args.scale_coarse},
    }
    rows = []
    for n in [int(v) for v in str(args.scale).split(",") if v.strip()]:
        root = os.path.join(work, f"scale_{n}")
        row = _child(_distributed, address, root, n, opts)
        if args.scale_single:
            row["single"] = _child(_single, os.path.join(root, "emb"), n, opts)
        print(json.dumps(row), flush=True)
        print(f"bench curate: {n} done", file=sys.stderr)
        rows.append(row)
        if not args.scale_keep:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    return rows
