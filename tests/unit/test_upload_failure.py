"""A checkpoint whose upload fails is not left on local disk: the worker's local copy is
deleted, and Ray Train's retry of the same checkpoint gets the same error."""

import os

import pytest
import ray.train

from raysl.train import storage, upload


class _Refused(OSError):
    pass


def _refusing_fs(after: int):
    """A filesystem that takes `after` files, then refuses the next (a bucket gone mid-upload)."""
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    class Refusing(FSSpecHandler):
        taken = 0

        def open_output_stream(self, path, metadata):
            if Refusing.taken >= after:
                raise _Refused(f"bucket unreachable: {path}")
            Refusing.taken += 1
            return super().open_output_stream(path, metadata)

    return PyFileSystem(Refusing(fsspec.filesystem("file")))


class _Target:
    """The part of Ray Train's storage context that the upload uses."""

    def __init__(self, root, fs):
        self.root, self.storage_filesystem = root, fs

    def build_checkpoint_path_from_name(self, name: str) -> str:
        return f"{self.root}/{name}"


def _written() -> str:
    d = storage.scratch_dir(upload.SCRATCH)
    os.makedirs(os.path.join(d, "engine"))
    for rel in ("engine/a.pt", "engine/b.pt", storage.worker_listing(0)):
        with open(os.path.join(d, rel), "wb") as f:
            f.write(os.urandom(100_000))
    return d


def test_a_failed_upload_deletes_its_local_copy_and_a_retry_fails_the_same(tmp_path):
    uploads = upload.Uploads(0, in_background=True)
    d = _written()
    target = _Target(str(tmp_path / "store"), _refusing_fs(after=1))
    ckpt = ray.train.Checkpoint.from_directory(d)
    with pytest.raises(_Refused) as first:
        uploads._upload(ckpt, "checkpoint_x", target)
    assert not os.path.exists(d)
    assert not uploads.running  # the next checkpoint does not wait for it
    with pytest.raises(_Refused) as again:  # Ray Train's retry: the same error, not a missing directory
        uploads._upload(ckpt, "checkpoint_x", target)
    assert again.value is first.value


def test_a_successful_upload_leaves_the_local_copy_to_ray(tmp_path):
    uploads = upload.Uploads(0, in_background=False)
    d = _written()
    target = _Target(str(tmp_path / "store"), _refusing_fs(after=100))
    got = uploads._upload(ray.train.Checkpoint.from_directory(d), "checkpoint_y", target)
    assert got.path == f"{tmp_path}/store/checkpoint_y"
    assert storage.listing(got.path) == storage.listing(d)
    assert uploads.last_bytes == 300_000 and uploads.last_cpu_s > 0
    storage.delete_dir(d)


def test_a_checkpoint_that_cannot_be_written_leaves_no_local_copy():
    made: list[str] = []

    def write(d: str) -> None:
        made.append(d)
        with open(os.path.join(d, "part.pt"), "wb") as f:
            f.write(b"x" * 1000)
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        upload.Uploads(0, in_background=True).report({"step": 1}, write)
    assert made and not os.path.exists(made[0])
