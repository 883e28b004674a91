"""Checkpoints: DeepSpeed's files plus the run's state (rank 0's raysl_state.json: where
the data stands, in rows per stream, and the images seen; nothing per worker, so a run
resumes on any number of workers), reported to Ray Train, and loaded without ever
unpickling arbitrary objects (weights_only=True)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from raysl.data.schema import filesystem_and_path
from raysl.errors import UserError
from raysl.train import (
    reshard,  # loads a checkpoint of another number of workers
    storage,
)
from raysl.train.storage import RUN_STATE, worker_listing  # rank 0's state file; each worker's file listing
from raysl.train.zero_gather import save_full_state

# 3: the run's state in raysl_state.json, no worker_<rank>.pt; 2: every worker lists its files
# (worker_<rank>.json), its data position in worker_<rank>.pt; 1 (no "format" key): no listings
FORMAT = 3

ENGINE_TAG = "engine"
WEIGHTS = "weights.safetensors"  # the method's full state (backbone, heads, teachers), fp32, rank 0


def _deepspeed_safe_globals() -> list:
    # Plain data holders DeepSpeed writes into ZeRO optimizer files; allowing them lets
    # torch.load keep weights_only=True (nothing else can be constructed).
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def safe_load(path: str, map_location="cpu"):
    with torch.serialization.safe_globals(_deepspeed_safe_globals()):
        return torch.load(path, map_location=map_location, weights_only=True)


class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
    def load(self, path: str, map_location=None):
        return safe_load(path, map_location=map_location)


_NOT_FOR_LOAD = {WEIGHTS, "zero_to_fp32.py", "zero_to_torch.py"}  # eval/export's weights; DeepSpeed's scripts


def files_for_rank(names: list[str], meta: dict, rank: int, world_size: int) -> list[str]:
    """The files of a stored checkpoint (`names`: every relpath in it; `meta`: its
    raysl_state.json) that `load` reads on this rank: the run state, the files every rank
    shares (DeepSpeed's `latest`, `mp_rank_00_model_states.pt` with the
    weights under ZeRO-0/1/2) and this rank's own DeepSpeed partition. Not the other ranks'
    partitions, so a restore moves the same bytes per worker at any number of workers.
    Written by another number of workers: the old partitions that overlap this rank's new
    ones (raysl.train.reshard)."""
    if int(meta["world_size"]) != world_size:
        return sorted(reshard.files_for_rank(names, meta, rank, world_size))
    mine = []
    for rel in names:
        owned = reshard.ZERO_FILE.search(rel)  # one rank's ZeRO partition (optimizer; ZeRO-3 weights too)
        if rel.rsplit("/", 1)[-1] in _NOT_FOR_LOAD or reshard.WORKER_FILE.search(rel):  # listings: not loaded
            continue
        if owned is None or int(owned.group(1)) == rank:
            mine.append(rel)
    return sorted(mine)


@contextlib.contextmanager
def fetched(path: str, *, rank: int, world_size: int) -> Iterator[tuple[str, int]]:
    """(a local directory to `load` the checkpoint at `path` from on this rank, the bytes
    downloaded for it). On a local disk: the checkpoint itself, read in place; for a URI:
    a temporary copy of just the files this rank reads (`files_for_rank`)."""
    if not storage.is_uri(path):
        yield path, 0
        return
    with tempfile.TemporaryDirectory(prefix="raysl_restore_") as d:
        moved = storage.download_files(path, [RUN_STATE], d)
        with open(os.path.join(d, RUN_STATE)) as f:
            meta = json.load(f)
        names = [n for n in files_for_rank(storage.listing(path), meta, rank, world_size) if n != RUN_STATE]
        yield d, moved + storage.download_files(path, names, d)


def save(directory: str, engine, *, rank: int, world_size: int, state: dict) -> None:
    """Every worker calls this (DeepSpeed's save is collective); each writes its own files.
    Rank 0 also writes the whole model as safetensors, which eval and export read
    without unpickling anything or knowing about ZeRO partitions."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG)
    # streamed by rank 0, gathered one parameter at a time under ZeRO-3 (every rank takes part)
    save_full_state(engine.module, os.path.join(directory, WEIGHTS), keep=rank == 0)
    if rank == 0:
        with open(os.path.join(directory, RUN_STATE), "w") as f:
            meta = {"step": state["step"], "world_size": world_size, "format": FORMAT}
            json.dump({**meta, "state": state, "zero": reshard.layout(engine)}, f)
    # Last, this worker's listing: name and size of every file it wrote here (each worker
    # saves into its own directory, which Ray Train uploads into the shared checkpoint).
    # storage.checkpoint_problem compares the listings with what reached storage.
    files = {}
    for folder, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, directory).replace(os.sep, "/")] = os.path.getsize(path)
    with open(os.path.join(directory, worker_listing(rank)), "w") as f:
        json.dump({"step": state["step"], "files": files}, f)


def load(directory: str, engine, *, rank: int, world_size: int) -> dict:
    """Restore the engine (model, optimizer incl. 8-bit state); returns rank 0's
    raysl_state.json. A checkpoint of another number of workers is cut anew
    (raysl.train.reshard)."""
    meta_path = os.path.join(directory, RUN_STATE)
    if not os.path.exists(meta_path):
        raise UserError(f"checkpoint {directory} is incomplete (no {RUN_STATE}); it cannot be resumed from")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta["world_size"] != world_size:  # another number of workers: the partitions are cut anew
        reshard.restore(
            directory, engine, meta, rank=rank, world_size=world_size, tag=ENGINE_TAG, weights=WEIGHTS, read=safe_load
        )
        return meta
    path, _ = engine.load_checkpoint(directory, tag=ENGINE_TAG)
    if path is None:
        raise UserError(f"checkpoint {directory}: DeepSpeed found no engine state under tag {ENGINE_TAG!r}")
    return meta


def run_state(ckpt: str) -> dict:
    """The run's state a complete checkpoint (a local directory or a URI) was written with:
    step, epoch, the epoch's streams and the rows consumed of each, images seen, ..."""
    fs, path = filesystem_and_path(f"{ckpt.rstrip('/')}/{RUN_STATE}")
    with fs.open_input_stream(path) as f:
        meta = json.loads(f.read())
    if "state" not in meta:
        raise UserError(
            f"checkpoint {ckpt} was written by an older raysl, which kept each worker's data position in "
            "worker_<rank>.pt; resume it with that version (same train.num_workers), or start a new run"
        )
    return meta["state"]
