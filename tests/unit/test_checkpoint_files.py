"""Which files of a stored checkpoint each rank downloads to resume (checkpoint.files_for_rank),
for the files DeepSpeed 0.19 writes at each ZeRO stage, and the parallel copy both ways."""

import os

import pytest

from raysl.train import checkpoint, storage


def _names(world: int, zero: int, bf16: bool = False) -> list[str]:
    """The relpaths a `world`-worker checkpoint holds (checkpoint.save + DeepSpeed's save_checkpoint)."""
    prefix = "bf16_" if bf16 else ""
    names = ["raysl_state.json", "weights.safetensors", "latest", "zero_to_fp32.py", "zero_to_torch.py"]
    names += [f"worker_{r}.json" for r in range(world)]
    if zero == 3:  # every rank: its partition of the weights and of the optimizer
        names += [f"engine/zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    else:  # rank 0: the whole weights (and under ZeRO-0 the optimizer inside)
        names.append("engine/mp_rank_00_model_states.pt")
    if zero:
        names += [f"engine/{prefix}zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    return names


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("bf16", [False, True])
def test_each_rank_gets_its_own_partition_and_the_shared_files_only(zero, bf16):
    world = 4
    names = _names(world, zero, bf16)
    for rank in range(world):
        mine = checkpoint.files_for_rank(names, {"world_size": world}, rank, world)
        expected = {"raysl_state.json", "latest"}
        if zero == 3:
            expected.add(f"engine/zero_pp_rank_{rank}_mp_rank_00_model_states.pt")
        else:
            expected.add("engine/mp_rank_00_model_states.pt")
        if zero:
            expected.add(f"engine/{'bf16_' if bf16 else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
        assert sorted(mine) == sorted(expected)


def test_the_number_of_files_per_rank_does_not_grow_with_the_workers():
    counts = {w: len(checkpoint.files_for_rank(_names(w, 2), {"world_size": w}, w - 1, w)) for w in (2, 16, 1024)}
    assert len(set(counts.values())) == 1, counts
    # rank 1 is not rank 10 or 100
    mine = checkpoint.files_for_rank(_names(128, 2), {"world_size": 128}, 1, 128)
    assert "engine/zero_pp_rank_1_mp_rank_00_optim_states.pt" in mine
    assert not any("rank_1" in n and "rank_1_" not in n for n in mine)  # not rank 10, 11, ...


def test_a_checkpoint_of_another_world_size_without_its_layout_is_taken_whole():
    names = _names(4, 2)
    assert checkpoint.files_for_rank(names, {"world_size": 4}, 0, 2) == sorted(names)


def test_a_checkpoint_of_another_world_size_gives_the_overlapping_partitions():
    meta = {"world_size": 4, "zero": {"stage": 2, "groups": [{"base": 1000, "extent": 1000}]}}
    mine = checkpoint.files_for_rank(_names(4, 2), meta, 1, 2)  # [500, 1000) of 4 x 250
    assert {n for n in mine if "optim" in n} == {
        f"engine/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 2, 3)
    }  # old 0's for the shared state


def test_upload_puts_everything_and_download_moves_the_bytes_asked_for(tmp_path):
    import pyarrow.fs

    src = tmp_path / "src"
    (src / "engine").mkdir(parents=True)
    files = {"engine/a.pt": 3_000_000, "engine/b.pt": 10, "worker_0.pt": 7, "worker_0.json": 5}
    for rel, size in files.items():
        (src / rel).write_bytes(os.urandom(size))
    dest = tmp_path / "store" / "checkpoint_x"
    moved = storage.upload_dir(str(src), pyarrow.fs.LocalFileSystem(), str(dest), last="worker_0.json")
    assert moved.nbytes == sum(files.values())
    assert storage.listing(str(dest)) == sorted(files)
    got = tmp_path / "got"
    assert storage.download_files(str(dest), ["engine/a.pt", "worker_0.pt"], str(got)) == 3_000_007
    assert (got / "engine" / "a.pt").read_bytes() == (src / "engine" / "a.pt").read_bytes()
    assert not (got / "engine" / "b.pt").exists()


def test_the_listing_is_uploaded_only_after_every_other_file(tmp_path):
    import fsspec
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    opened: list[str] = []

    class Recording(FSSpecHandler):
        def open_output_stream(self, path, metadata):
            opened.append(path.rsplit("/", 1)[-1])
            return super().open_output_stream(path, metadata)

    src = tmp_path / "src"
    (src / "engine").mkdir(parents=True)
    for name in ("engine/a.pt", "engine/b.pt", "worker_0.pt", "worker_0.json", "z.bin"):
        (src / name).write_bytes(os.urandom(100_000))
    fs = PyFileSystem(Recording(fsspec.filesystem("file")))
    storage.upload_dir(str(src), fs, str(tmp_path / "dest"), last="worker_0.json")
    assert sorted(opened) == ["a.pt", "b.pt", "worker_0.json", "worker_0.pt", "z.bin"]
    assert opened[-1] == "worker_0.json"
