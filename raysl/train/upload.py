"""How each worker's checkpoint reaches the run's storage: through Ray Train's report, with
raysl's own copy (`storage.upload_dir`: several files at a time, the worker's listing last,
so a copy cut short is never taken as complete) and, on a bucket, in the background.

Ray Train runs background uploads one after another on one thread per worker, but its
`report` returns at once, so checkpoints written faster than they upload would pile up on
local disk; `wait()` before writing the next one keeps one in flight. Ray deletes the local
copy once it is uploaded, and waits for the last upload when the training function returns."""

from __future__ import annotations

import threading
import time

import ray.train

from raysl.train import storage


def background(mode: str, run_dir: str) -> bool:
    """train.checkpoint_upload: auto uploads in the background to a bucket only (to a local
    path the copy is a fast local one, and the worker keeps its simple synchronous order)."""
    return mode == "async" or (mode == "auto" and storage.is_uri(run_dir))


class Uploads:
    """One worker's checkpoint uploads, one at a time. `last_bytes` / `last_s`: the newest
    finished upload's size and duration."""

    def __init__(self, rank: int, *, in_background: bool):
        self.rank, self.in_background = rank, in_background
        self._idle = threading.Event()
        self._idle.set()
        self.last_bytes, self.last_s = 0, 0.0

    @property
    def running(self) -> bool:
        return not self._idle.is_set()

    def wait(self) -> None:
        """Until the previous checkpoint's upload has ended (at once when none is running)."""
        self._idle.wait()

    def report(self, metrics: dict, directory: str) -> None:
        """`ray.train.report` the metrics with the checkpoint written in the local `directory`
        (deleted once uploaded). In the background it returns before the upload ends."""
        self.wait()
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
            self._idle.set()
            raise

    def _upload(self, ckpt: ray.train.Checkpoint, name: str, target) -> ray.train.Checkpoint:
        try:
            dest = target.build_checkpoint_path_from_name(name)
            t0 = time.perf_counter()
            moved = storage.upload_dir(
                ckpt.path,
                target.storage_filesystem,
                dest,
                last=storage.worker_listing(self.rank),
                background=self.in_background,
            )
            self.last_bytes, self.last_s = moved, time.perf_counter() - t0
            return ray.train.Checkpoint(path=dest, filesystem=target.storage_filesystem)
        finally:
            self._idle.set()
