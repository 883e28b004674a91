"""Resume a checkpoint written by N workers on M workers (ZeRO 0-3, fp32 and bitsandbytes 8-bit state).

DeepSpeed loads ZeRO-1/2/3 optimizer files only at the data-parallel size that wrote them,
and its universal-checkpoint converter knows only fp32 Adam state. Here each new worker
reads the old workers' files whose partitions overlap its own new partition (no others),
lays their tensors out in the parameters' flat order and cuts its new partition out:

- the method (students, heads, EMA teachers, buffers) from weights.safetensors, exactly;
- the fp32 master weights from the saved fp32 partitions, exactly (under bf16 they hold
  more than the bf16 parameters);
- the optimizer state: fp32 tensors (AdamW's exp_avg, exp_avg_sq) exactly; bitsandbytes'
  8-bit state (uint8 state1/state2 with an absmax per 256-element block and its qmap)
  dequantised per old partition and quantised again per new partition with the
  optimizer's own qmap, so each value moves by at most one quantisation step; step counts
  as saved. A state key this module does not know is refused, never reset.

Layouts (DeepSpeed 0.19, deepspeed/runtime/zero): ZeRO-1/2 flattens each param group
(params in group order, an alignment gap after a param under `parameter_alignment`) and
pads it at the end to a multiple of 2 * world; worker r owns flat[r*P:(r+1)*P] and its
file holds that partition without the padding (SINGLE_PARTITION_OF_FP32_GROUPS) and the
base optimizer's state of it. ZeRO-3 partitions each parameter alone, ceil(numel/world)
elements per worker (the last one padded), and a worker's fp32 sub-group is the
concatenation of its partitions of the sub-group's parameters. ZeRO-0 keeps everything in
the world-size-free mp_rank_00 file: DeepSpeed's own load works there at any size."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from raysl.errors import UserError

BLOCKSIZE = 256  # bitsandbytes' blockwise 8-bit optimizers quantise their state per 256 elements
ZERO_FILE = re.compile(r"(?:^|/)(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_(optim|model)_states\.pt$")
MODEL_STATES = re.compile(r"(?:^|/)(?:(?:bf16_)?zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")
COUNTERS = ("global_steps", "global_samples", "skipped_steps")  # the engine's, restored as saved
WORKER_FILE = re.compile(r"(?:^|/)worker_\d+\.json$")  # each worker's listing of what it wrote
ALIGNMENT = 2  # ZeRO-1/2's nccl_start_alignment_factor: the flat group is padded to 2 * world


def layout(engine) -> dict:
    """What `files_for_rank` needs to know of the checkpoint's partitions, recorded in
    raysl_state.json at save: the ZeRO stage and per param group its sizes (ZeRO-1/2: the
    flat group's extent and the size DeepSpeed aligns; ZeRO-3: each parameter's numel), and
    the engine's step counters, so a resharding reads no model-states file (under ZeRO-1/2
    DeepSpeed's holds the whole module)."""
    stage = engine.zero_optimization_stage()
    out: dict = {"stage": stage, "counters": {key: getattr(engine, key) for key in COUNTERS}}
    opt = engine.optimizer
    if stage in (1, 2):
        out["groups"] = [
            {"extent": _extent(opt, g), "base": sum(m.numel() for m in metas) + sum(opt.round_robin_bit16_padding[g])}
            for g, metas in enumerate(opt.round_robin_bit16_meta)
        ]
    elif stage == 3:
        out["groups"] = [{"numels": [p.ds_numel for p in params]} for params in _zero3_groups(opt)]
    return out


def files_for_rank(names: list[str], meta: dict, rank: int, world_size: int) -> list[str]:
    """Of a checkpoint's files (`names`, paths relative to it), those that worker `rank` of
    a `world_size`-worker run reads to resume a checkpoint of another size (`meta`: its
    raysl_state.json): the shared files and the ZeRO files of the old workers whose
    partitions overlap its new ones (and old worker 0's, which every new worker reads for
    the shared state); no worker's listing.
    Without a recorded layout (older checkpoints): all of them."""
    zero = meta.get("zero")
    if zero is None:
        return list(names)
    needed = old_ranks_for(zero, meta["world_size"], rank, world_size) | {0}
    out = []
    for name in names:
        zero_file, worker = ZERO_FILE.search(name), WORKER_FILE.search(name)
        if zero["stage"] and "counters" in zero and MODEL_STATES.search(name):
            continue  # the whole module (ZeRO-1/2) or a partition's empty one (ZeRO-3): not read
        if zero_file is not None:
            k = int(zero_file.group(1))
            if k == 0 or (zero_file.group(2) == "optim" and k in needed):
                out.append(name)
        elif worker is None:
            out.append(name)
    return out


def old_ranks_for(zero: dict, old_world: int, rank: int, world_size: int) -> set[int]:
    """Old workers whose ZeRO partitions overlap worker `rank`'s partitions at `world_size`."""
    ranks: set[int] = set()
    if zero["stage"] in (1, 2):
        for g in zero["groups"]:
            old_p = _aligned(g["base"], old_world) // old_world
            new_p = _aligned(g["base"], world_size) // world_size
            ranks |= _overlap(rank * new_p, min((rank + 1) * new_p, g["extent"]), old_p)
    elif zero["stage"] == 3:
        for n in {n for g in zero["groups"] for n in g["numels"]}:
            new_q, old_q = -(-n // world_size), -(-n // old_world)
            ranks |= _overlap(rank * new_q, min((rank + 1) * new_q, n), old_q)
    return ranks


def _aligned(base: int, world: int) -> int:
    return math.ceil(base / (ALIGNMENT * world)) * ALIGNMENT * world


def _overlap(start: int, end: int, old_size: int) -> set[int]:
    return set(range(start // old_size, (end - 1) // old_size + 1)) if end > start else set()


def restore(
    directory: str, engine, meta: dict, *, rank: int, world_size: int, tag: str, weights: str, read: Callable
) -> None:
    """Load the checkpoint in `directory` (written by meta["world_size"] workers) into this
    worker's freshly built `engine` of a `world_size`-worker run. `read(path)` loads one of
    DeepSpeed's files without unpickling (raysl.train.checkpoint.safe_load)."""
    stage, old_world = engine.zero_optimization_stage(), meta["world_size"]
    zero = meta.get("zero") or {"stage": stage}
    written = zero["stage"]
    if written != stage:
        raise UserError(
            f"checkpoint {directory} was written by {old_world} workers under deepspeed.zero_stage={written}; resume "
            f"at another number of workers with that stage (this run has {stage})"
        )
    if stage == 0:  # one optimizer file for all workers: DeepSpeed's own load
        path, _ = engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise UserError(f"checkpoint {directory}: DeepSpeed found no engine state under tag {tag!r}")
        return
    _check_optimizer(directory, engine, stage, old_world, world_size)
    _load_module(os.path.join(directory, weights), engine.module, rank)
    _load_counters(directory, tag, engine, zero, read)
    files = _zero_files(directory, tag, engine, old_world, read)
    if stage == 3:
        _Zero3(directory, files, engine, old_world, rank, world_size).restore()
    else:
        _Zero12(directory, files, engine, old_world, rank, world_size).restore()


# ---------------------------------------------------------------- the method's weights


def _check_optimizer(directory: str, engine, stage: int, old_world: int, world_size: int) -> None:
    """The ZeRO optimizers whose layout this module knows: DeepSpeed's ZeRO-1/2 and ZeRO-3
    ones, their state in memory (not swapped to NVMe)."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    opt = engine.optimizer
    known = DeepSpeedZeroOptimizer_Stage3 if stage == 3 else DeepSpeedZeroOptimizer
    if not isinstance(opt, known) or getattr(opt, "swap_optimizer", False):
        raise UserError(
            f"checkpoint {directory} was written by {old_world} workers; this run ({world_size} workers) steps "
            f"{type(opt).__name__}, whose partitions raysl cannot cut anew (bf16 with fp32 gradient accumulation "
            f"under ZeRO-1, or optimizer state on NVMe); resume with train.num_workers={old_world}"
        )


def _load_module(path: str, module: torch.nn.Module, rank: int) -> None:
    """Every tensor of the module's state dict from the fp32 safetensors file; a ZeRO-3
    parameter gets only this worker's partition (ceil(numel/world) elements, zero padded),
    read as the rows that hold it, so no worker reads a whole partitioned tensor."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise UserError(f"checkpoint {os.path.dirname(path)} is incomplete (no {os.path.basename(path)})")
    with safe_open(path, framework="pt") as f, torch.no_grad():
        saved = set(f.keys())
        for key, t in module.state_dict(keep_vars=True).items():
            if key not in saved:
                raise UserError(f"{path}: no tensor {key!r}; the checkpoint is of another model or method")
            if not hasattr(t, "ds_tensor") or t.data.numel() == t.ds_numel:  # whole here (ZeRO-3: persistent)
                t.data.copy_(f.get_tensor(key).view_as(t.data))
            if hasattr(t, "ds_tensor"):
                part = t.ds_tensor
                part.zero_()
                start, end = rank * part.numel(), min((rank + 1) * part.numel(), t.ds_numel)
                if end > start:
                    part[: end - start].copy_(_flat_range(f.get_slice(key), start, end))


def _flat_range(tensor_slice, start: int, end: int) -> torch.Tensor:
    """Elements [start, end) of a stored tensor in row-major order, reading only its rows
    (of the first dimension) that hold them."""
    shape = tensor_slice.get_shape()
    row = math.prod(shape[1:])
    first, last = start // row, (end - 1) // row + 1
    return tensor_slice[first:last].reshape(-1)[start - first * row : end - first * row]


def _load_counters(directory: str, tag: str, engine, zero: dict, read: Callable) -> None:
    """The engine's step counters: recorded in raysl_state.json, or (older checkpoints) from
    DeepSpeed's model-states file, the same in every worker's."""
    if "counters" in zero:
        saved = zero["counters"]
    else:
        name = "zero_pp_rank_0_mp_rank_00_model_states.pt" if zero["stage"] == 3 else "mp_rank_00_model_states.pt"
        saved = read(_existing(os.path.join(directory, tag, name)))
    engine.global_steps = saved["global_steps"]
    engine.global_samples = saved.get("global_samples", engine.global_steps * engine.train_batch_size())
    engine.skipped_steps = saved["skipped_steps"]


def _existing(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"checkpoint {os.path.dirname(os.path.dirname(path))} is incomplete (no {path})")
    return path


# ---------------------------------------------------------------- optimizer state


class _Vector:
    """One per-element state of an old partition, read as fp32 a slice at a time (8-bit
    state dequantised block by block), so no whole fp32 copy of the old state is made."""

    def __init__(self, values: torch.Tensor, absmax: torch.Tensor | None = None, code: torch.Tensor | None = None):
        self.values, self.absmax, self.code = values.reshape(-1), absmax, code

    def slice(self, offset: int, count: int) -> torch.Tensor:
        if self.absmax is None:
            return self.values[offset : offset + count].float()
        import bitsandbytes.functional as F

        first, last = offset // BLOCKSIZE, (offset + count - 1) // BLOCKSIZE + 1
        blocks = F.dequantize_blockwise(
            self.values[first * BLOCKSIZE : last * BLOCKSIZE].contiguous(),
            absmax=self.absmax[first:last].contiguous(),
            code=self.code,
            blocksize=BLOCKSIZE,
        )
        start = offset - first * BLOCKSIZE
        return blocks[start : start + count].float()


Segment = tuple[int, tuple[int, int], int, int]  # (new offset, (old rank, old flat group), old offset, count)


@dataclass
class _Unit:
    """One old worker's partition of one flat group (ZeRO-1/2 group, ZeRO-3 sub-group):
    the fp32 master weights and the optimizer state, element by element in the same layout."""

    master: _Vector
    vectors: dict[str, _Vector] = field(default_factory=dict)
    scalars: dict = field(default_factory=dict)


def _read_state(state: dict, size: int, where: str) -> tuple[dict[str, _Vector], dict]:
    """A base optimizer's saved state of one flat partition of `size` elements as
    per-element vectors (8-bit ones with their absmax and qmap) and scalars (step)."""
    state = dict(state)
    state.update(state.pop("__bnb_optimizer_quant_state__", {}))  # bitsandbytes' state_dict wraps these
    if not state:
        raise UserError(f"{where}: the optimizer state is empty (the checkpoint was written before any step?)")
    vectors, scalars = {}, {}
    for key, v in state.items():
        if key == "step":
            scalars[key] = v
        elif key.startswith(("qmap", "absmax")) or key == "unorm_vec":
            continue  # read with their state below; unorm_vec is recomputed by every step
        elif torch.is_tensor(v) and v.dtype == torch.uint8 and key.startswith("state") and v.numel() == size:
            n = key.removeprefix("state")
            for aux in (f"absmax{n}", f"qmap{n}"):
                if aux not in state:
                    raise UserError(f"{where}: 8-bit optimizer state {key!r} has no {aux!r}")
            vectors[key] = _Vector(v, state[f"absmax{n}"].reshape(-1), state[f"qmap{n}"])
        elif torch.is_tensor(v) and v.is_floating_point() and v.numel() == size:
            vectors[key] = _Vector(v)
        else:
            raise UserError(
                f"{where}: optimizer state {key!r} ({type(v).__name__}{tuple(v.shape) if torch.is_tensor(v) else ''}) "
                f"is not a per-element state of this partition ({size} elements); it cannot be resharded"
            )
    return vectors, scalars


def _cut(segments: list[Segment], units: dict, key: str | None, size: int, where: str) -> torch.Tensor:
    """A new flat partition of `size` elements (zeros where no old data falls: padding) from
    segments (new offset, old unit, old offset, count) of the old units' state `key`
    (None: the master weights)."""
    out = torch.zeros(size, dtype=torch.float32)
    for new_off, src, old_off, count in segments:
        unit = units[src]
        if key is not None and key not in unit.vectors:
            raise UserError(f"{where}: old worker {src[0]}'s optimizer state has no {key!r}")
        vector = unit.master if key is None else unit.vectors[key]
        out[new_off : new_off + count].copy_(vector.slice(old_off, count))
    return out


def _put_state(base, group_index: int, p: torch.Tensor, keys, cut, scalars: dict, where: str) -> None:
    """Give the base optimizer the state of its flat parameter `p`, each of `keys` cut by
    `cut(key)`: a bitsandbytes optimizer gets the state its own init_state makes for `p`
    (8-bit with its qmaps where p is large enough, else fp32), filled by quantising per
    256-element block; a torch optimizer gets the fp32 vectors as they are."""
    from bitsandbytes.optim.optimizer import Optimizer8bit

    if isinstance(base, Optimizer8bit):
        base.state[p] = {}
        base.init_state(base.param_groups[group_index], p, group_index, 0)
        state = base.state[p]
        wanted = {k for k in state if k.startswith("state") and k[5:].isdigit()}
        if wanted != set(keys):
            raise UserError(
                f"{where}: the checkpoint has optimizer state {sorted(keys)}, this optimizer {sorted(wanted)}"
            )
        for key in keys:
            v, dst = cut(key), state[key]
            if dst.dtype == torch.uint8:
                n = key.removeprefix("state")
                quantize_nearest(v, state[f"qmap{n}"], dst.view(-1), state[f"absmax{n}"])
            else:
                dst.copy_(v.view_as(dst))
            del v
    else:
        base.state[p] = {key: cut(key).view_as(p).to(p.device) for key in keys}
    for key, v in scalars.items():
        base.state[p][key] = v.clone() if torch.is_tensor(v) else v


def quantize_nearest(values: torch.Tensor, code: torch.Tensor, out: torch.Tensor, absmax: torch.Tensor) -> None:
    """bitsandbytes' blockwise 8-bit format (per 256-element block its absmax; per element
    the index of the `code` value nearest to value / absmax), as bitsandbytes' reference
    implementation rounds (backends/triton/kernels_optim.py: _quantize_blockwise_pytorch):
    each value lands within half a code gap. Its compiled CPU kernel searches the code by
    bisection and can land several codes off for values near zero (1e-9 of the absmax
    became 1.6e-5 of it), more than one quantisation step. Done in chunks, so the
    temporaries stay small."""
    sorted_code, order = torch.sort(code.float().cpu())
    chunk = BLOCKSIZE * 65536
    for start in range(0, values.numel(), chunk):
        v = values[start : start + chunk].float().cpu()
        blocks = -(-v.numel() // BLOCKSIZE)
        padded = torch.nn.functional.pad(v, (0, blocks * BLOCKSIZE - v.numel())).view(blocks, BLOCKSIZE)
        peak = padded.abs().amax(dim=1)
        peak[peak == 0] = 1.0  # an all-zero block: every element is code 0 whatever the scale
        x = (padded / peak[:, None]).reshape(-1)[: v.numel()]
        i = torch.searchsorted(sorted_code, x).clamp(1, len(sorted_code) - 1)
        nearest = torch.where(x - sorted_code[i - 1] <= sorted_code[i] - x, i - 1, i)
        out[start : start + v.numel()].copy_(order[nearest].to(torch.uint8))
        absmax[start // BLOCKSIZE : start // BLOCKSIZE + blocks].copy_(peak)


class _Zero12:
    """ZeRO-1/2: per param group, the flat partitions cut at the new boundaries."""

    def __init__(self, directory, files, engine, old_world, rank, world):
        self.dir, self.files, self.engine, self.old_world = directory, files, engine, old_world
        self.rank, self.world = rank, world
        self.opt = engine.optimizer

    def restore(self) -> None:
        from deepspeed.checkpoint.constants import (
            BASE_OPTIMIZER_STATE,
            GROUP_PADDINGS,
            PARAM_ALIGNMENT_PADDINGS,
            PARTITION_COUNT,
            SINGLE_PARTITION_OF_FP32_GROUPS,
        )

        opt = self.opt
        n_groups = len(opt.single_partition_of_fp32_groups)
        extents = [_extent(opt, g) for g in range(n_groups)]
        new_sizes = [int(s) for s in opt.partition_size]
        files = self.files
        first = files.get(0)
        old_sizes = [
            first[SINGLE_PARTITION_OF_FP32_GROUPS][g].numel() + first[GROUP_PADDINGS][g] for g in range(n_groups)
        ]
        segments = [
            _segments_flat(self.rank * new_sizes[g], min((self.rank + 1) * new_sizes[g], extents[g]), old_sizes[g])
            for g in range(n_groups)
        ]
        units: dict[tuple[int, int], _Unit] = {}
        for k in sorted({src for segs in segments for _, src, _, _ in segs} | {0}):
            sd, where = files.get(k), files.where(k)
            if sd.get(PARTITION_COUNT) not in (self.old_world, [self.old_world] * n_groups):
                raise UserError(
                    f"{where}: written by {sd.get(PARTITION_COUNT)} workers, raysl_state.json says {self.old_world}"
                )
            if sd.get(PARAM_ALIGNMENT_PADDINGS, opt.round_robin_bit16_padding) != opt.round_robin_bit16_padding:
                raise UserError(f"{where}: written under another zero_optimization.parameter_alignment setting")
            base_sd = sd[BASE_OPTIMIZER_STATE]
            if not isinstance(base_sd, dict) or len(base_sd["param_groups"]) != n_groups:
                raise UserError(f"{where}: its optimizer state has not the {n_groups} param groups of this optimizer")
            for g in range(n_groups):
                pid = base_sd["param_groups"][g]["params"][0]
                vectors, scalars = _read_state(base_sd["state"].get(pid, {}), old_sizes[g], f"{where} group {g}")
                units[(k, g)] = _Unit(_Vector(sd[SINGLE_PARTITION_OF_FP32_GROUPS][g]), vectors, scalars)
            if k == 0:
                opt._load_global_state(sd)  # loss scaler, clipping (DeepSpeed's own reader)
        base = opt.optimizer
        for g, p in enumerate(opt.single_partition_of_fp32_groups):
            segs = [(o, (k, g), old, c) for o, k, old, c in segments[g]]
            where = f"{self.dir} group {g}"
            p.data.copy_(_cut(segs, units, None, p.numel(), where).view_as(p).to(p.dtype))
            ref = units[(0, g)]
            cut = partial(_cut, segs, units, size=p.numel(), where=where)
            _put_state(base, g, p, list(ref.vectors), cut, ref.scalars, where)
        # DeepSpeed's views of each parameter's fragment of the master weights and state
        # (safe_get_full_*, universal checkpoints) onto the new tensors
        opt._link_all_hp_params()
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()


def _extent(opt, g: int) -> int:
    """Elements of ZeRO-1/2 flat group g before its end padding (params and alignment gaps)."""
    return sum(m.numel() for m in opt.round_robin_bit16_meta[g]) + sum(opt.round_robin_bit16_padding[g])


def _segments_flat(start: int, end: int, old_size: int) -> list[tuple[int, int, int, int]]:
    """Global range [start, end) of a flat group as (offset from start, old rank, offset in
    its partition, count)."""
    out, pos = [], start
    while pos < end:
        k = pos // old_size
        count = min(end, (k + 1) * old_size) - pos
        out.append((pos - start, k, pos - k * old_size, count))
        pos += count
    return out


class _Zero3:
    """ZeRO-3: each parameter's partition cut at the new boundaries, within the sub-groups."""

    def __init__(self, directory, files, engine, old_world, rank, world):
        self.dir, self.files, self.engine, self.old_world = directory, files, engine, old_world
        self.rank, self.world = rank, world
        self.opt = engine.optimizer

    def restore(self) -> None:
        from deepspeed.checkpoint.constants import FP32_FLAT_GROUPS, OPTIMIZER_STATE_DICT, PARTITION_COUNT

        opt = self.opt
        groups = _zero3_groups(opt)  # trainable params per base param group, in DeepSpeed's order
        files = self.files
        first, where0 = files.get(0), files.where(0)
        # where each parameter lies in the old sub-groups: DeepSpeed cut each param group into
        # sub-groups by the old partition sizes; the saved flat groups' sizes say where
        old_flats = first[FP32_FLAT_GROUPS]
        base_groups = first[OPTIMIZER_STATE_DICT]["param_groups"]
        if len(base_groups) != len(groups):
            raise UserError(f"{where0}: its optimizer state has not the {len(groups)} param groups of this optimizer")
        old_place: dict[int, tuple[int, int]] = {}  # param -> (old sub-group, offset in it)
        sub = 0
        for g, params in enumerate(groups):
            ids = base_groups[g]["params"]
            i, offset = 0, 0
            for p in params:
                if i >= len(ids):
                    raise UserError(f"{where0}: its ZeRO-3 sub-groups do not hold this model's parameters")
                old_place[id(p)] = (sub + i, offset)
                offset += -(-p.ds_numel // self.old_world)
                if offset == old_flats[sub + i].numel():
                    i, offset = i + 1, 0
            if i != len(ids) or offset:
                raise UserError(f"{where0}: its ZeRO-3 sub-groups do not hold this model's parameters")
            sub += len(ids)
        state_ids = [pid for bg in base_groups for pid in bg["params"]]
        group_of_sub = [g for g, bg in enumerate(base_groups) for _ in bg["params"]]

        # the new sub-groups' segments: (offset in the new flat, (old rank, old sub-group), old offset, count)
        segments: list[list[Segment]] = []
        for params in opt.fp16_groups:
            segs: list[Segment] = []
            new_off = 0
            for p in params:
                n, q_new, q_old = p.ds_numel, p.ds_tensor.ds_numel, -(-p.ds_numel // self.old_world)
                old_sub, old_off = old_place[id(p)]
                for o, k, ko, c in _segments_flat(self.rank * q_new, min((self.rank + 1) * q_new, n), q_old):
                    segs.append((new_off + o, (k, old_sub), old_off + ko, c))
                new_off += q_new
            segments.append(segs)

        units: dict[tuple[int, int], _Unit] = {}
        for k in sorted({src[0] for segs in segments for _, src, _, _ in segs} | {0}):
            sd, where = files.get(k), files.where(k)
            if sd.get(PARTITION_COUNT) not in (self.old_world, [self.old_world]):
                raise UserError(
                    f"{where}: written by {sd.get(PARTITION_COUNT)} workers, raysl_state.json says {self.old_world}"
                )
            base_sd = sd[OPTIMIZER_STATE_DICT]
            for s, flat in enumerate(sd[FP32_FLAT_GROUPS]):
                vectors, scalars = _read_state(
                    base_sd["state"].get(state_ids[s], {}), flat.numel(), f"{where} sub-group {s}"
                )
                units[(k, s)] = _Unit(_Vector(flat), vectors, scalars)
            if k == 0:
                opt.loss_scaler = sd["loss_scaler"]
                opt.dynamic_loss_scale = sd["dynamic_loss_scale"]
                opt.overflow = sd["overflow"]

        base = opt.optimizer
        for s, fp32 in enumerate(opt.fp32_partitioned_groups_flat):
            g = opt.sub_group_to_group_id[s]
            first_old = next(i for i, og in enumerate(group_of_sub) if og == g)  # same step in every sub-group
            ref = units[(0, first_old)]
            segs, where = segments[s], f"{self.dir} sub-group {s}"
            fp32.data.copy_(_cut(segs, units, None, fp32.numel(), where).to(fp32.dtype))
            base.param_groups[g]["params"] = [fp32]  # as DeepSpeed's step puts it there
            try:
                cut = partial(_cut, segs, units, size=fp32.numel(), where=where)
                _put_state(base, g, fp32, list(ref.vectors), cut, ref.scalars, where)
            finally:
                base.param_groups[g]["params"] = []
            # the low-precision partitions from the fp32 ones (DeepSpeed's _rigid_load_state_dict)
            opt.fp16_partitioned_groups_flat[s].data.copy_(fp32.data)
            for part, q in zip(
                opt.fp16_partitioned_groups[s],
                opt.unflatten(opt.fp16_partitioned_groups_flat[s], opt.fp16_partitioned_groups[s]),
                strict=True,
            ):
                part.data = q.data


def _zero3_groups(opt) -> list[list[Any]]:
    """ZeRO-3's trainable parameters per base param group, in sub-group order."""
    groups: dict[int, list] = {}
    for s, params in enumerate(opt.fp16_groups):
        groups.setdefault(opt.sub_group_to_group_id[s], []).extend(params)
    return [groups[g] for g in sorted(groups)]


class _ZeroFiles:
    """The old workers' ZeRO optimizer files, each read (weights_only) when first asked for."""

    def __init__(self, paths: dict[int, str], read: Callable):
        self.paths, self.read, self.cache = paths, read, dict[int, dict]()

    def where(self, k: int) -> str:
        return self.paths[k]

    def get(self, k: int) -> dict:
        if k not in self.cache:
            self.cache[k] = self.read(_existing(self.paths[k]))["optimizer_state_dict"]
        return self.cache[k]


def _zero_files(directory: str, tag: str, engine, old_world: int, read: Callable) -> _ZeroFiles:
    """DeepSpeed names them bf16_zero_pp_rank_* under bf16, zero_pp_rank_* otherwise."""
    prefix = "bf16_" if engine.bfloat16_enabled() else ""
    names = {k: f"{prefix}zero_pp_rank_{k}_mp_rank_00_optim_states.pt" for k in range(old_world)}
    return _ZeroFiles({k: os.path.join(directory, tag, name) for k, name in names.items()}, read)
