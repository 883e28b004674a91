"""Part files: the unit of work, of memory and of resumption of the curate steps.

Every step after `embed` is a series of tasks, each reading a few parquet parts and writing
one. A part is written whole or not at all (a temporary name, then a rename; an object on a
bucket appears whole when its upload completes), so a part that exists is finished. A task's
small summary (its counts, its peak memory) is kept in its part's footer: a rerun of a
killed step skips the parts that exist and reads their summaries back, as if it had run them.

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


def write(table: pa.Table, uri: str, summary: dict | None = None, row_groups: Sequence[int] | None = None) -> dict:
    """Write `table` to `uri` atomically, with `summary` (JSON) in its footer; `row_groups`:
    rows per row group, in order (default: one row group). Returns the summary, with the
    writing process's peak memory added."""
    summary = dict(summary or {}, peak_rss=peak_rss())
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SUMMARY_KEY: json.dumps(summary)})
    fs, path = fs_path(uri)
    local = isinstance(fs, pafs.LocalFileSystem)
    fs.create_dir(posixpath.dirname(path), recursive=True)
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with pq.ParquetWriter(tmp if local else path, table.schema, filesystem=fs) as writer:
        sizes = list(row_groups) if row_groups is not None else [table.num_rows]
        lo = 0
        for n in sizes:
            writer.write_table(table.slice(lo, n), row_group_size=max(n, 1))
            lo += n
    if local:
        os.replace(tmp, path)
    if os.environ.get(PAUSE_ENV):
        time.sleep(float(os.environ[PAUSE_ENV]))
    return summary


def summary(uri: str) -> dict:
    """The summary a part was written with (footer only)."""
    fs, path = fs_path(uri)
    with fs.open_input_file(path) as f:
        meta = pq.read_metadata(f).metadata or {}
    return json.loads(meta.get(SUMMARY_KEY, b"{}"))


def read_groups(uri: str, key: str, wanted: int, columns: list[str] | None = None) -> pa.Table | None:
    """The rows of a part written in row groups, one per value of `key` (named in its summary
    as `key`: the values in row-group order), whose value is `wanted`; None if it has none."""
    fs, path = fs_path(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        values = json.loads((pf.schema_arrow.metadata or {}).get(SUMMARY_KEY, b"{}")).get(key, [])
        at = [i for i, v in enumerate(values) if v == wanted]
        return pf.read_row_groups(at, columns=columns) if at else None


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
