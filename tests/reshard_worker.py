"""Workers for tests/drills/test_reshard.py: spawned processes in a gloo world (as Ray
Train gives its workers) that train and save a checkpoint at one size and resume it at
another, for every ZeRO stage and optimizer of CASES. Each writes what it saw to
`<dir>/<phase>_rank<r>.pt` for the test to compare."""

from __future__ import annotations

import copy
import os
import traceback

import torch
import torch.distributed as dist
import zero3_worker as w

# (ZeRO stage, optimizer[+bf16]): under bf16 the fp32 master weights hold more than the parameters
CASES = [(stage, opt) for stage in (0, 1, 2, 3) for opt in ("adamw", "adamw8bit", "lion8bit")]
CASES += [(2, "adamw+bf16"), (3, "adamw8bit+bf16")]


def config(stage: int, opt: str):
    name, _, precision = opt.partition("+")
    return w.cfg_for("byol", zero=stage, optimizer=name, precision=precision or "fp32")


ADAM_KEYS = ("exp_avg", "exp_avg_sq")


def step(built, cfg, s: int, rank: int) -> float:
    """Step `s` of worker `rank` as the training loop takes it, views in the engine's precision."""
    from raysl.train.engine import DTYPES
    from raysl.train.trainer import train_step

    engine, method, schedules = built
    views = [v.to(DTYPES[cfg.deepspeed.precision]) for v in w.views(s, rank)]
    out = train_step(engine, method, engine.optimizer, [views], {**schedules.at(s), "step": s})
    return float(out["loss"].detach().float())


def case_dir(directory: str, stage: int, opt: str) -> str:
    return os.path.join(directory, f"zero{stage}_{opt}")


def snapshot(engine, method, stage: int, opt: str, rank: int) -> dict:
    """What DeepSpeed itself reports of the engine: the whole fp32 master weight and
    AdamW state of every trainable parameter (collective under ZeRO-3), or under ZeRO-0
    the optimizer's own state dict; and the whole method."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from raysl.train.zero_gather import full_state_dict

    out: dict = {"model": full_state_dict(method, keep=rank == 0)}
    if stage == 0:
        out["optimizer"] = copy.deepcopy(engine.optimizer.state_dict())  # its tensors are the live state
        return out
    if stage in (1, 2):  # DeepSpeed maps the state keys that exist when it links (after group 0's first step)
        engine.optimizer._link_all_hp_params()
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out["master"], out["adam"] = {}, {}
    for name, p in method.named_parameters():
        if not p.requires_grad:
            continue
        out["master"][name] = safe_get_full_fp32_param(p).detach().cpu().clone()
        if opt.startswith("adamw+") or opt == "adamw":
            out["adam"][name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu().clone() for k in ADAM_KEYS}
    return out


def phase_save(rank: int, world: int, directory: str, out: dict) -> None:
    from raysl.train import checkpoint

    for stage, opt in CASES:
        cfg = config(stage, opt)
        built = w.build(cfg)
        for s in range(2):
            step(built, cfg, s, rank)
        d = os.path.join(case_dir(directory, stage, opt), "ckpt")
        checkpoint.save(d, built[0], rank=rank, world_size=world, state={"step": 2, "epoch": 0, "position": 0})
        out[(stage, opt)] = snapshot(built[0], built[1], stage, opt, rank)


def own_copy(ckpt: str, rank: int, world: int) -> str:
    """This worker's local copy of the checkpoint as a restore downloads it: only the files
    `reshard.files_for_rank` names for it."""
    import json
    import shutil

    from raysl.train import reshard

    with open(os.path.join(ckpt, "raysl_state.json")) as f:
        meta = json.load(f)
    if meta["world_size"] == world:
        return ckpt
    names = [os.path.relpath(os.path.join(f, n), ckpt) for f, _, ns in os.walk(ckpt) for n in ns]
    local = f"{ckpt}_{world}_rank{rank}"
    for name in reshard.files_for_rank(names, meta, rank, world):
        os.makedirs(os.path.dirname(os.path.join(local, name)), exist_ok=True)
        shutil.copy(os.path.join(ckpt, name), os.path.join(local, name))
    return local


def phase_load(rank: int, world: int, directory: str, out: dict, cases=CASES) -> None:
    """Resume each case's checkpoint, snapshot, save it again at this size (the test reads
    both checkpoints' files), then take one more step."""
    from raysl.train import checkpoint

    for stage, opt in cases:
        cfg = config(stage, opt)
        built = w.build(cfg, seed=1)  # other initial weights: everything must come from the checkpoint
        d = case_dir(directory, stage, opt)
        state = checkpoint.load(own_copy(os.path.join(d, "ckpt"), rank, world), built[0], rank=rank, world_size=world)
        got = snapshot(built[0], built[1], stage, opt, rank)
        got["state"] = state
        got["global_steps"] = built[0].global_steps
        checkpoint.save(
            os.path.join(d, f"resumed{world}"), built[0], rank=rank, world_size=world, state={"step": 2, "epoch": 0}
        )
        got["next_loss"] = step(built, cfg, 2, rank)
        out[(stage, opt)] = got


def worker(rank: int, world: int, port: int, directory: str, phase: str) -> None:
    from raysl.train.local_world import join_local_world

    torch.set_num_threads(1)
    join_local_world(rank, world, port)
    out: dict = {}
    try:
        if phase == "save":
            phase_save(rank, world, directory, out)
        elif phase == "same":
            phase_load(rank, world, directory, out, cases=[(2, "adamw8bit"), (3, "lion8bit")])
        else:
            phase_load(rank, world, directory, out)
    except BaseException:
        out["error"] = traceback.format_exc()
    torch.save(out, os.path.join(directory, f"{phase}{world}_rank{rank}.pt"))
    dist.destroy_process_group()
