"""Part files: the unit of work, of memory and of resumption of the curate steps.

Every step after `embed` is a series of tasks, each reading a few parts and writing one
(parquet; an Arrow IPC file of blocks where each task of the next phase reads one block).
A part is written whole or not at all (a temporary name, then a rename; an object on a
bucket appears whole when its upload completes), so a part that exists is finished. A
task's small summary (its counts, its peak memory) is kept in its part's footer: a rerun of
a killed step skips the parts that exist and reads their summaries back, as if it had run
them.

Tasks run as Ray tasks (one CPU each) when Ray is connected, else one after another in this
process. Either way one task holds one part's worth of rows: memory does not grow with the
number of embeddings.

A step's working parts live in OUT/.work/ beside the selection it writes, with the settings
they were made with (plan.json): a rerun with other settings starts over, and the folder is
removed once the selection is complete.
"""

from __future__ import annotations

import json
import os
import posixpath
import resource
import sys
import time
import uuid
from collections.abc import Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

PAUSE_ENV = "RAYSL_CURATE_PAUSE_S"  # tests: a task sleeps this long after writing its part
WORK = ".work"
PLAN = "plan.json"
SUMMARY_KEY = b"raysl.part"


def fs_path(uri: str) -> tuple[pafs.FileSystem, str]:
    from raysl.data.schema import filesystem_and_path

    return filesystem_and_path(uri)


def join(root: str, *names: str) -> str:
    return posixpath.join(root, *names) if "://" in root else os.path.join(root, *names)


def exists(uri: str) -> bool:
    fs, path = fs_path(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def makedirs(uri: str) -> None:
    fs, path = fs_path(uri)
    fs.create_dir(path, recursive=True)


def remove(uri: str) -> None:
    """A file, or a folder and everything in it (nothing if absent)."""
    fs, path = fs_path(uri)
    kind = fs.get_file_info(path).type
    if kind == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif kind == pafs.FileType.File:
        fs.delete_file(path)


def peak_rss() -> int:
    """Peak resident bytes of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _atomic(uri: str, write_to) -> None:
    """write_to(filesystem, path) under a temporary name, then renamed to `uri` (on a bucket,
    written in place: an object appears whole when its upload completes)."""
    fs, path = fs_path(uri)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):
        write_to(fs, path)
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    write_to(fs, tmp)
    os.replace(tmp, path)


def _with_summary(table: pa.Table, summary: dict | None) -> tuple[pa.Table, dict]:
    summary = dict(summary or {}, peak_rss=peak_rss())
    return table.replace_schema_metadata({**(table.schema.metadata or {}), SUMMARY_KEY: json.dumps(summary)}), summary


def _pause() -> None:
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))


def write(table: pa.Table, uri: str, summary: dict | None = None) -> dict:
    """Write `table` as a parquet part, atomically, with `summary` (JSON) in its footer.
    Returns the summary, with the writing process's peak memory added."""
    table, summary = _with_summary(table, summary)
    _atomic(uri, lambda fs, path: pq.write_table(table, path, filesystem=fs))
    _pause()
    return summary


def write_blocks(table: pa.Table, uri: str, key: str, values: Sequence[int], sizes: Sequence[int], summary=None):
    """Write `table` as an Arrow IPC file of blocks (record batches) of `sizes` rows, block i
    holding the rows whose `key` is values[i], atomically: a task of a later phase reads
    only its block of each such part (read_block), without parsing anything else of it."""
    table, summary = _with_summary(table, dict(summary or {}, **{key: [int(v) for v in values]}))

    def write_to(fs, path):
        with fs.open_output_stream(path) as sink, pa.ipc.new_file(sink, table.schema) as writer:
            lo = 0
            for n in sizes:
                writer.write_batch(table.slice(lo, n).combine_chunks().to_batches()[0] if n else _empty(table))
                lo += n

    _atomic(uri, write_to)
    _pause()
    return summary


def _empty(table: pa.Table) -> pa.RecordBatch:
    return pa.RecordBatch.from_pylist([], schema=table.schema)


def summary(uri: str) -> dict:
    """The summary a part was written with (its footer only)."""
    fs, path = fs_path(uri)
    with fs.open_input_file(path) as f:
        if path.endswith(".arrow"):
            meta = pa.ipc.open_file(f).schema.metadata or {}
        else:
            meta = pq.read_metadata(f).metadata or {}
    return json.loads(meta.get(SUMMARY_KEY, b"{}"))


def read_block(uri: str, key: str, wanted: int) -> pa.Table | None:
    """The block of an IPC part (write_blocks) whose `key` is `wanted`; None if it has none."""
    fs, path = fs_path(uri)
    with fs.open_input_file(path) as f:
        reader = pa.ipc.open_file(f)
        values = json.loads((reader.schema.metadata or {}).get(SUMMARY_KEY, b"{}")).get(key, [])
        if wanted not in values:
            return None
        return pa.Table.from_batches([reader.get_batch(values.index(wanted))])


def write_array(uri: str, x: np.ndarray, summary: dict | None = None) -> None:
    """A float32 matrix as a parquet part (one fixed-size list column)."""
    x = np.ascontiguousarray(x, np.float32)
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1])
    write(pa.table({"x": col}), uri, summary)


def read_array(uri: str) -> np.ndarray:
    fs, path = fs_path(uri)
    col = pq.read_table(path, filesystem=fs).column("x").combine_chunks()
    return col.flatten().to_numpy().reshape(len(col), -1)


def open_work(out: str, settings: dict, restart: bool, outputs: Sequence[str] = ()) -> str:
    """OUT/.work for a step with `settings`: kept when it holds the parts of the same
    settings (a rerun resumes), else emptied together with `outputs` (what else of OUT the
    step writes), as it is with `restart`. Returns its path."""
    work = join(out, WORK)
    plan = join(work, PLAN)
    same = False
    if exists(plan) and not restart:
        fs, path = fs_path(plan)
        with fs.open_input_stream(path) as f:
            same = json.loads(f.read()) == json.loads(json.dumps(settings))
    if not same:
        for folder in (work, *(join(out, o) for o in outputs)):
            remove(folder)
        makedirs(work)
        fs, path = fs_path(plan)
        with fs.open_output_stream(path) as f:
            f.write(json.dumps(settings, indent=2, sort_keys=True).encode())
    return work


def share(x):
    """`x` for many tasks: put in Ray's object store once when Ray is connected."""
    ray = _ray()
    return ray.put(x) if ray is not None else x


def _ray():
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    return ray if ray.is_initialized() else None


def map_tasks(fn: Callable, calls: Sequence[tuple], label: str, *, unit: str = "part") -> list:
    """fn(*args) for each args of `calls`, as Ray tasks (one CPU each) when Ray is connected;
    the results in order."""
    from raysl.progress import bar

    ray = _ray()
    if ray is None:
        results = []
        with bar(len(calls), label, unit) as progress:
            for args in calls:
                results.append(fn(*args))
                progress.update(1)
        return results
    remote = ray.remote(num_cpus=1, max_retries=2)(fn)
    refs = [remote.remote(*args) for args in calls]
    position = {ref: i for i, ref in enumerate(refs)}
    results = [None] * len(refs)
    pending = list(refs)
    with bar(len(calls), label, unit) as progress:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                results[position[ref]] = ray.get(ref)
                progress.update(1)
    return results


def run_parts(fn: Callable, calls: Sequence[tuple], outputs: Sequence[str], label: str) -> list[dict]:
    """fn(*args, out) for each args whose part `out` does not exist yet; the summaries of all
    parts, in order, those of parts an earlier run finished read from their footers. Says on
    stderr how many parts were reused."""
    todo = [i for i, out in enumerate(outputs) if not exists(out)]
    reused = len(outputs) - len(todo)
    if reused:
        print(f"{label}: {reused} of {len(outputs)} parts already done, reused", file=sys.stderr)
    done = map_tasks(fn, [(*calls[i], outputs[i]) for i in todo], label) if todo else []
    fresh = dict(zip(todo, done))
    return [fresh[i] if i in fresh else dict(summary(out), reused=True) for i, out in enumerate(outputs)]


def part_name(i: int) -> str:
    return f"part-{i:05d}.parquet"
