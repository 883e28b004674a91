"""How each worker's checkpoint reaches the run's storage: through Ray Train's report, with
raysl's own copy (`storage.upload_dir`: several files at a time, the worker's listing last,
so a copy cut short is never taken as complete) and, on a bucket, in the background.

Ray Train runs background uploads one after another on one thread per worker, but its
`report` returns at once, so checkpoints written faster than they upload would pile up on
local disk; `wait()` before writing the next one keeps one in flight. Ray deletes the local
copy once it is uploaded, and waits for the last upload when the training function returns.

The local copy is deleted too when it cannot be written or uploaded; what a killed worker
leaves behind is deleted by the next worker that starts on the node (`storage.remove_dead_scratch`)."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable

import ray.train

from raysl.train import storage


def background(mode: str, run_dir: str) -> bool:
    """train.checkpoint_upload: auto uploads in the background to a bucket only (to a local
    path the copy is a fast local one, and the worker keeps its simple synchronous order)."""
    return mode == "async" or (mode == "auto" and storage.is_uri(run_dir))


SCRATCH = "ckpt"  # the local copies: storage.scratch_dir("ckpt")


class Uploads:
    """One worker's checkpoint uploads, one at a time. `last_bytes` / `last_s` / `last_cpu_s`:
    the newest finished upload's size, duration and the CPU time of the threads that copied it."""

    def __init__(self, rank: int, *, in_background: bool):
        self.rank, self.in_background = rank, in_background
        self._idle = threading.Event()
        self._idle.set()
        self._failed: dict[str, BaseException] = {}  # checkpoint name: why its upload failed
        self.last_bytes, self.last_s, self.last_cpu_s = 0, 0.0, 0.0
        storage.remove_dead_scratch(SCRATCH)

    @property
    def running(self) -> bool:
        return not self._idle.is_set()

    def wait(self) -> None:
        """Until the previous checkpoint's upload has ended (at once when none is running)."""
        self._idle.wait()

    def report(self, metrics: dict, write: Callable[[str], object]) -> None:
        """`write(directory)` this worker's checkpoint into a new local directory and
        `ray.train.report` it with the metrics (the directory is deleted once uploaded). In the
        background it returns before the upload ends."""
        self.wait()
        directory = storage.scratch_dir(SCRATCH)
        try:
            write(directory)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._idle.clear()
        target = ray.train.get_context().get_storage()
        mode = ray.train.CheckpointUploadMode
        try:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_upload_mode=mode.ASYNC if self.in_background else mode.SYNC,
                checkpoint_upload_fn=lambda ckpt, name: self._upload(ckpt, name, target),
                delete_local_checkpoint_after_upload=True,
            )
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            self._idle.set()
            raise

    def _upload(self, ckpt: ray.train.Checkpoint, name: str, target) -> ray.train.Checkpoint:
        try:
            if name in self._failed:  # Ray Train retrying it: the local copy is gone
                raise self._failed[name]
            dest = target.build_checkpoint_path_from_name(name)
            t0 = time.perf_counter()
            copied = storage.upload_dir(
                ckpt.path,
                target.storage_filesystem,
                dest,
                last=storage.worker_listing(self.rank),
                background=self.in_background,
            )
            self.last_bytes, self.last_s, self.last_cpu_s = copied.nbytes, time.perf_counter() - t0, copied.cpu_s
            return ray.train.Checkpoint(path=dest, filesystem=target.storage_filesystem)
        except BaseException as exc:
            # not kept on local disk: the run goes on from an earlier checkpoint (pyarrow's S3
            # client has already retried each request)
            self._failed.setdefault(name, exc)
            shutil.rmtree(ckpt.path, ignore_errors=True)
            raise
        finally:
            self._idle.set()
