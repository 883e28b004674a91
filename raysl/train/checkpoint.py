"""Checkpoints: DeepSpeed's files plus one small state file per worker, reported to Ray
Train, and loaded without ever unpickling arbitrary objects (weights_only=True)."""

from __future__ import annotations

import json
import os

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from raysl.errors import UserError
from raysl.train.reshard import layout, restore  # loads a checkpoint of another number of workers
from raysl.train.storage import RUN_STATE, worker_listing  # rank 0's state file; each worker's file listing
from raysl.train.zero_gather import save_full_state

FORMAT = 2  # 2: every worker lists its files (worker_<rank>.json); 1 (no "format" key): no listings

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


def worker_file(rank: int) -> str:
    return f"worker_{rank}.pt"


def save(directory: str, engine, *, rank: int, world_size: int, state: dict) -> None:
    """Every worker calls this (DeepSpeed's save is collective); each writes its own files.
    Rank 0 also writes the whole model as safetensors, which eval and export read
    without unpickling anything or knowing about ZeRO partitions."""
    engine.save_checkpoint(directory, tag=ENGINE_TAG)
    # streamed by rank 0, gathered one parameter at a time under ZeRO-3 (every rank takes part)
    save_full_state(engine.module, os.path.join(directory, WEIGHTS), keep=rank == 0)
    torch.save({**state, **rng_state()}, os.path.join(directory, worker_file(rank)))
    if rank == 0:
        with open(os.path.join(directory, RUN_STATE), "w") as f:
            json.dump({"step": state["step"], "world_size": world_size, "format": FORMAT, "zero": layout(engine)}, f)
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
    """Restore engine (model, optimizer incl. 8-bit state) and this worker's state. A
    checkpoint of another number of workers is cut anew (raysl.train.reshard); a worker the
    old run did not have gets rank 0's state without its random generators."""
    meta_path = os.path.join(directory, RUN_STATE)
    if not os.path.exists(meta_path):
        raise UserError(f"checkpoint {directory} is incomplete (no {RUN_STATE}); it cannot be resumed from")
    with open(meta_path) as f:
        meta = json.load(f)
    resized = meta["world_size"] != world_size
    mine = os.path.join(directory, worker_file(rank))
    if not os.path.exists(mine) and not resized:
        raise UserError(f"checkpoint {directory} is incomplete (no {worker_file(rank)}); it cannot be resumed from")
    if resized:  # another number of workers: the partitions are cut anew (raysl.train.reshard)
        restore(
            directory, engine, meta, rank=rank, world_size=world_size, tag=ENGINE_TAG, weights=WEIGHTS, read=safe_load
        )
    else:
        path, _ = engine.load_checkpoint(directory, tag=ENGINE_TAG)
        if path is None:
            raise UserError(f"checkpoint {directory}: DeepSpeed found no engine state under tag {ENGINE_TAG!r}")
    if not os.path.exists(mine):
        # a worker the old run did not have: rank 0's shared state; this worker keeps the
        # random generators its own seed gave it (another worker's would repeat its draws)
        state = safe_load(os.path.join(directory, worker_file(0)))
        for key in RNG_KEYS:
            state.pop(key, None)
        return state
    state = safe_load(mine)
    set_rng_state(state)
    return state


RNG_KEYS = ("torch_rng", "cuda_rng")


def rng_state() -> dict:
    """This process's random generators: torch's CPU generator and, when CUDA is up, every
    visible GPU's (dropout, drop-path and masks draw from the generator of their device).
    raysl's loop and methods draw from no numpy or Python generator (the views are seeded
    per image in Ray Data tasks), so those are not saved."""
    rng: dict[str, torch.Tensor | list[torch.Tensor]] = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda_rng"] = torch.cuda.get_rng_state_all()  # a list of uint8 tensors: weights_only loads it
    return rng


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved, popping its keys from `state`. GPU states are
    restored for the GPUs this process sees (a checkpoint written on CPU has none)."""
    torch.set_rng_state(state.pop("torch_rng"))
    cuda = state.pop("cuda_rng", None)
    if cuda is not None and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
