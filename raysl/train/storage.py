"""Where a run's files live: a local (or NFS) directory, or a bucket URI (s3://, gs://,
file://, anything pyarrow.fs understands). The only module that knows the difference.

For a URI, rank 0 writes the run's files (metrics.jsonl, tensorboard/, pictures) into a
local staging directory and `RunFiles.sync` copies what changed to `<URI>/<name>/`; the
driver writes config.yaml and the plots straight to the URI."""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
import time
from typing import NamedTuple

from raysl.data.schema import filesystem_and_path  # a local path or any URI pyarrow opens

RUN_STATE = "raysl_state.json"  # rank 0 writes it last into a checkpoint (raysl.train.checkpoint)


def is_uri(path: str) -> bool:
    return "://" in path


def scratch_dir(kind: str) -> str:
    """A new local temporary directory, `raysl_<kind>_pid<this process's pid>_<host>_*`: the pid
    lets a later process on the node tell what a dead one left behind (`remove_dead_scratch`);
    the host name keeps containers that share one temporary folder but not their process ids
    away from each other's directories."""
    return tempfile.mkdtemp(prefix=f"raysl_{kind}_pid{os.getpid()}_{_host()}_")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname()) or "host"


def remove_dead_scratch(kind: str) -> list[str]:
    """Delete the `scratch_dir(kind)` directories whose process no longer runs (killed, or
    ended by an error before it removed them); a running process's are never touched.
    Returns the paths removed."""
    root, removed = tempfile.gettempdir(), []
    for name in os.listdir(root):
        found = re.fullmatch(rf"raysl_{re.escape(kind)}_pid(\d+)_{re.escape(_host())}_.+", name)
        if found and not _running(int(found.group(1))):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(os.path.join(root, name))
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def run_dir(storage_path: str, name: str) -> str:
    """`<storage_path>/<name>`: an absolute local path, or the URI as given."""
    base = storage_path if is_uri(storage_path) else os.path.abspath(storage_path)
    return f"{base.rstrip('/')}/{name}"


def _join(uri: str, *names: str) -> str:
    return "/".join([uri.rstrip("/"), *names])


def exists(path: str) -> bool:
    import pyarrow.fs

    fs, p = filesystem_and_path(path)
    return fs.get_file_info(p).type != pyarrow.fs.FileType.NotFound


def subdirs(path: str, prefix: str = "") -> list[str]:
    """Names of the directories in `path` (a local dir or a URI) that start with `prefix`,
    sorted; [] when `path` is not there."""
    import pyarrow.fs

    fs, root = filesystem_and_path(path)
    if fs.get_file_info(root).type != pyarrow.fs.FileType.Directory:
        return []
    return sorted(
        info.base_name
        for info in fs.get_file_info(pyarrow.fs.FileSelector(root))
        if info.type == pyarrow.fs.FileType.Directory and info.base_name.startswith(prefix)
    )


def checkpoint_dirs(run: str, *, only: tuple[str, ...] | None = None) -> list[tuple[str, bool]]:
    """(name, complete) of each `checkpoint_*` directory of the run, sorted by name
    (Ray Train names them by time); complete: `checkpoint_problem` finds nothing wrong."""
    return [(name, checkpoint_problem(_join(run, name), only=only) is None) for name in subdirs(run, "checkpoint_")]


def worker_listing(rank: int) -> str:
    """Each worker's list of the files it wrote into a checkpoint, with their sizes."""
    return f"worker_{rank}.json"


def _read_json(fs, path: str):
    import json

    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _listing_problem(listed: dict[str, int], sizes: dict[str, int]) -> str | None:
    for rel, size in sorted(listed.items()):
        if rel not in sizes:
            return f"{rel} is missing"
        if sizes[rel] != size:
            return f"{rel} is truncated ({sizes[rel]} of {size} bytes)"
    return None


def checkpoint_problem(ckpt: str, *, only: tuple[str, ...] | None = None) -> str | None:
    """Why the checkpoint directory (local or URI) cannot be resumed from, or None when it
    is complete: rank 0's state file names the world size, and every worker's listing is
    there and matches the stored files by name and size (a worker killed mid-upload leaves
    a file missing or short). One listing of the directory plus one small read per worker;
    at 1,024 workers that is ~1,000 reads of a few hundred bytes, done in parallel.
    `only` (eval, export): just these files of rank 0 matter, e.g. weights.safetensors of a
    run copied without its optimizer state."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs

    fs, root = filesystem_and_path(ckpt)
    try:
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    except (FileNotFoundError, OSError):
        return "not readable"
    sizes = {i.path[len(root) :].lstrip("/"): i.size for i in infos if i.type == pyarrow.fs.FileType.File}
    if RUN_STATE not in sizes:
        return f"no {RUN_STATE} (rank 0 had not finished writing it)"
    try:
        meta = _read_json(fs, f"{root}/{RUN_STATE}")
        world = int(meta["world_size"]) if only is None else 1
    except (ValueError, KeyError, TypeError, OSError):
        return f"{RUN_STATE} is damaged"
    if only is not None or "format" not in meta:  # written before per-worker listings, or a part of rank 0's files
        wanted = only or [f"worker_{r}.pt" for r in range(world)]
        missing = [rel for rel in wanted if rel not in sizes]
        if missing or worker_listing(0) not in sizes:
            return f"{missing[0]} is missing" if missing else None
        try:
            listed = _read_json(fs, f"{root}/{worker_listing(0)}")["files"]
        except (ValueError, KeyError, TypeError, OSError):
            return f"{worker_listing(0)} is damaged"
        return _listing_problem({rel: size for rel, size in listed.items() if rel in wanted}, sizes)

    def worker_problem(rank: int) -> str | None:
        name = worker_listing(rank)
        if name not in sizes:
            return f"{name} is missing (worker {rank} had not finished uploading)"
        try:
            listed = _read_json(fs, f"{root}/{name}")["files"]
        except (ValueError, KeyError, TypeError, OSError):
            return f"{name} is damaged"
        return _listing_problem(listed, sizes)

    with ThreadPoolExecutor(max_workers=min(32, world)) as pool:
        return next((p for p in pool.map(worker_problem, range(world)) if p), None)


def checkpoint_step(ckpt: str) -> int:
    """The step a complete checkpoint was written at (rank 0's state file)."""
    return int(_read_json(*filesystem_and_path(f"{ckpt.rstrip('/')}/{RUN_STATE}"))["step"])


def write_text(path: str, text: str) -> None:
    """Write a text file at a local path or a URI, creating its folder."""
    fs, p = filesystem_and_path(path)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(text.encode())


def download(uri: str, local: str) -> bool:
    """Copy one file from the URI to `local`; False when there is none."""
    if not exists(uri):
        return False
    import pyarrow.fs

    os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    pyarrow.fs.copy_files(uri, local)
    return True


def upload(local: str, uri: str) -> None:
    import pyarrow.fs

    fs, p = filesystem_and_path(uri)
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    pyarrow.fs.copy_files(local, uri)


TRANSFER_THREADS = 8  # files moved at once; outside a background upload a large one also goes up in parallel parts
_CHUNK = 64 * 1024 * 1024
_UPLOAD_CHUNK = 8 * 1024 * 1024  # read and sent a piece at a time: at most this much per file in memory


def listing(path: str) -> list[str]:
    """Every file under the directory `path` (local or URI), as relpaths."""
    import pyarrow.fs

    fs, root = filesystem_and_path(path)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) :].lstrip("/") for i in infos if i.type == pyarrow.fs.FileType.File)


def download_files(path: str, names: list[str], local: str) -> int:
    """Copy these files (relpaths) of the directory `path` (local or URI) into the local
    directory `local`, several at a time; returns the bytes moved."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs

    fs, root = filesystem_and_path(path)
    into = pyarrow.fs.LocalFileSystem()

    def one(rel: str) -> int:
        dst = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        pyarrow.fs.copy_files(
            f"{root}/{rel}", dst, source_filesystem=fs, destination_filesystem=into, chunk_size=_CHUNK
        )
        return os.path.getsize(dst)

    with ThreadPoolExecutor(max_workers=TRANSFER_THREADS) as pool:
        return sum(pool.map(one, names))


def _yield_cpu() -> None:
    """The calling thread runs only on a core no other thread wants (Linux's SCHED_IDLE, per
    thread; elsewhere nothing changes): a background upload takes the CPU training leaves."""
    if hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))


def _writes_in_caller(fs):
    """`fs` with pyarrow's S3 `background_writes` off: each part is sent by the thread that
    writes it, so the copy's work runs at that thread's priority and holds one part per
    file in memory (with them on, parts queue in memory on pyarrow's shared IO threads)."""
    import pyarrow.fs

    if not isinstance(fs, pyarrow.fs.S3FileSystem):
        return fs
    _, (options,) = fs.__reduce__()  # every option, as it is pickled to Ray's workers
    return pyarrow.fs.S3FileSystem(**{**options, "background_writes": False})


class Copied(NamedTuple):
    nbytes: int
    cpu_s: float  # CPU time of the threads that copied the files (in the background: all of the client's work)


def upload_dir(local: str, fs, dest: str, *, last: str, background: bool = False) -> Copied:
    """Copy the local directory `local` to `dest` on the pyarrow filesystem `fs`, several
    files at a time, and the file `last` (a relpath) only once all others are there: a
    copy cut short never has it. Each file is copied in one of our threads (one
    multi-threaded copy_files to S3 can hang, apache/arrow#32372).
    `background`: those threads run at the lowest CPU priority and send the S3 parts
    themselves, so the whole upload yields to training."""
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.fs

    names = [
        os.path.relpath(os.path.join(folder, n), local).replace(os.sep, "/")
        for folder, _, files in os.walk(local)
        for n in files
    ]
    for folder in sorted({f"{dest}/{rel}".rsplit("/", 1)[0] for rel in names}):
        fs.create_dir(folder, recursive=True)
    src = pyarrow.fs.LocalFileSystem()
    if background:
        fs = _writes_in_caller(fs)

    def one(rel: str) -> Copied:
        path = os.path.join(local, *rel.split("/"))
        cpu = time.thread_time()
        pyarrow.fs.copy_files(
            path,
            f"{dest}/{rel}",
            source_filesystem=src,
            destination_filesystem=fs,
            chunk_size=_UPLOAD_CHUNK,
            use_threads=False,  # in this thread, not on pyarrow's IO threads
        )
        return Copied(os.path.getsize(path), time.thread_time() - cpu)

    with ThreadPoolExecutor(max_workers=TRANSFER_THREADS, initializer=_yield_cpu if background else None) as pool:
        copied = list(pool.map(one, [rel for rel in names if rel != last]))
        copied += [pool.submit(one, last).result()] if last in names else []
    return Copied(sum(c.nbytes for c in copied), sum(c.cpu_s for c in copied))


class RunFiles:
    """Rank 0's run directory. `local` is where files are written: the run dir itself
    when it is a local path, else a staging dir that `sync()` mirrors to the URI."""

    def __init__(self, run: str, *, fetch: tuple[str, ...] = ()):
        self.run = run
        self.remote = is_uri(run)
        self._uploaded: dict[str, tuple[int, int]] = {}
        if not self.remote:
            self.local = run
            os.makedirs(run, exist_ok=True)
            return
        remove_dead_scratch("run")
        self.local = scratch_dir("run")
        for name in fetch:  # e.g. metrics.jsonl on resume: it is appended to, then uploaded whole
            if download(_join(run, name), os.path.join(self.local, name)):
                self._uploaded[name] = self._stamp(name)

    def _stamp(self, rel: str) -> tuple[int, int]:
        st = os.stat(os.path.join(self.local, rel))
        return st.st_size, st.st_mtime_ns

    def sync(self) -> list[str]:
        """Copy the files that are new or changed since the last sync; returns their names."""
        if not self.remote:
            return []
        copied = []
        for folder, _, files in os.walk(self.local):
            for name in files:
                rel = os.path.relpath(os.path.join(folder, name), self.local).replace(os.sep, "/")
                stamp = self._stamp(rel)
                if self._uploaded.get(rel) != stamp:
                    upload(os.path.join(self.local, rel), _join(self.run, rel))
                    self._uploaded[rel] = stamp
                    copied.append(rel)
        return sorted(copied)

    def close(self) -> None:
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


def read_text(path: str) -> str:
    """A text file at a local path or a URI."""
    fs, p = filesystem_and_path(path)
    with fs.open_input_stream(p) as f:
        return f.read().decode()


def fetch(src: str, into: str, patterns: tuple[str, ...]) -> dict[str, int]:
    """Copy the files of `src` (a local dir or a URI) whose path relative to it matches one of
    `patterns` (fnmatch; "a/b*.png" lists folder a only, never the whole tree) into the local
    folder `into`; returns {relative path: bytes copied}. What is not named is not read: eval,
    export and report take config.yaml and one checkpoint's weights from a run whose engine
    and optimizer files may be many times larger."""
    import fnmatch

    import pyarrow.fs

    fs, root = filesystem_and_path(src)
    local = pyarrow.fs.LocalFileSystem()
    copied: dict[str, int] = {}
    for folder in sorted({_folder(p) for p in patterns}):
        base = f"{root}/{folder}" if folder else root
        try:
            infos = fs.get_file_info(pyarrow.fs.FileSelector(base, allow_not_found=True))
        except (FileNotFoundError, OSError):
            continue
        for info in infos:
            rel = f"{folder}/{info.base_name}" if folder else info.base_name
            if info.type != pyarrow.fs.FileType.File or not any(fnmatch.fnmatchcase(rel, p) for p in patterns):
                continue
            target = os.path.join(into, *rel.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            pyarrow.fs.copy_files(info.path, target, source_filesystem=fs, destination_filesystem=local)
            copied[rel] = info.size
    return copied


def _folder(rel: str) -> str:
    return rel.rsplit("/", 1)[0] if "/" in rel else ""


def delete_dir(path: str) -> None:
    """Remove a folder (local or URI) and everything in it; nothing when it is not there."""
    import pyarrow.fs

    fs, p = filesystem_and_path(path)
    if fs.get_file_info(p).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir(p)
