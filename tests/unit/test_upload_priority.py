"""A background checkpoint upload yields the CPU to training: every file is copied by a
thread at Linux's lowest priority (SCHED_IDLE) that also sends the S3 parts itself."""

import os
import threading

import pytest

from raysl.train import storage

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="per-thread SCHED_IDLE is Linux's")


def _recording_fs(seen: list[tuple[str, int, int]]):
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    class Recording(FSSpecHandler):
        def open_output_stream(self, path, metadata):
            seen.append((path.rsplit("/", 1)[-1], threading.get_native_id(), os.sched_getscheduler(0)))
            return super().open_output_stream(path, metadata)

    return PyFileSystem(Recording(fsspec.filesystem("file")))


def _checkpoint(src) -> dict[str, int]:
    (src / "engine").mkdir(parents=True)
    files = {"engine/a.pt": 300_000, "engine/b.pt": 10, "worker_0.pt": 7, "worker_0.json": 5}
    for rel, size in files.items():
        (src / rel).write_bytes(os.urandom(size))
    return files


@pytest.mark.parametrize("background", [True, False])
def test_a_background_upload_copies_every_file_at_the_lowest_priority(tmp_path, background):
    files = _checkpoint(tmp_path / "src")
    seen: list[tuple[str, int, int]] = []
    moved = storage.upload_dir(
        str(tmp_path / "src"), _recording_fs(seen), str(tmp_path / "dest"), last="worker_0.json", background=background
    )
    assert moved.nbytes == sum(files.values())
    assert storage.listing(str(tmp_path / "dest")) == sorted(files)
    assert [name for name, _, _ in seen][-1] == "worker_0.json"  # still last
    assert threading.get_native_id() not in {tid for _, tid, _ in seen}  # never the caller's thread
    want = os.SCHED_IDLE if background else os.SCHED_OTHER
    assert {policy for _, _, policy in seen} == {want}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread keeps its priority


def test_the_upload_sends_s3_parts_from_its_own_threads_with_the_same_options():
    from pyarrow.fs import S3FileSystem

    fs = S3FileSystem(endpoint_override="http://127.0.0.1:9", region="eu-west-3", scheme="http", request_timeout=7)
    _, (before,) = fs.__reduce__()
    _, (after,) = storage._writes_in_caller(fs).__reduce__()
    assert before["background_writes"] and not after["background_writes"]
    assert {**after, "background_writes": True} == before
