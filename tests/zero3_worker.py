"""Two-worker ZeRO-3 drills for tests/test_zero3.py: each worker is a spawned process in a
gloo world of 2 (as Ray Train gives its workers), builds the method through
`raysl.train.zero.build_method` and goes through the engine, EMA, checkpoint, val_loss, kNN
and resume paths the training loop takes. Results go to `<out>/rank<r>.pt` for the test to
check against a plain single-process build."""

from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist

BATCH, SIZE = 4, 32


def cfg_for(method: str, zero: int = 3, optimizer: str = "adamw", precision: str = "fp32", **model):
    from raysl.config import from_dict

    extra = {
        "byol": {"pred_hidden_dim": 32, "ema_momentum": 0.9, "ema_momentum_end": 0.9},
        "dino": {"num_prototypes": 64, "ema_momentum": 0.9, "ema_momentum_end": 0.9},
        "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "mask_ratio": 0.5},
        "simclr": {},
        "ibot": {"num_prototypes": 64, "ema_momentum": 0.9, "ema_momentum_end": 0.9},
        "dinov2": {"num_prototypes": 64, "ema_momentum": 0.9, "ema_momentum_end": 0.9, "separate_head": True},
        "ijepa": {"predictor_dim": 32, "predictor_depth": 1, "predictor_heads": 2, "min_keep": 1},
    }[method]
    heads = {} if method in ("mae", "ijepa") else {"proj_hidden_dim": 32, "proj_dim": 16}
    return from_dict(
        {
            "data": {"batch_size": BATCH, "image_size": SIZE, **({"local_crops": 0} if method in MASKED else {})},
            "model": {"backbone": "test_vit", **model},
            "method": {"name": method, **heads, **extra},
            "optim": {"name": optimizer, "lr": 1.0},
            "deepspeed": {"zero_stage": zero, "precision": precision},
        }
    )


MASKED = ("ibot", "dinov2", "ijepa")  # methods whose views come with patch masks


def views(key: int, rank: int, n: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * (rank + 1) + key)
    return [torch.randn(BATCH, 3, SIZE, SIZE, generator=g) for _ in range(n)]


def n_views(method: str) -> int:
    return 1 if method in ("mae", "ijepa") else 2


def inputs(cfg, key: int, rank: int):
    """Micro-batch `key` of worker `rank`: its views, and for a masked method a Batch with
    the masks the data pipeline would draw for rows seeded 1000 * (rank + 1) + key + i."""
    import numpy as np

    from raysl.data.masks import draw_masks
    from raysl.methods.base import method_class
    from raysl.train.batch import Batch
    from raysl.train.run_views import spec_for

    vs = views(key, rank, n_views(cfg.method.name))
    if cfg.method.name not in MASKED:
        return vs
    spec = spec_for(cfg, method_class(cfg.method.name)).masks
    seeds = [1000 * (rank + 1) + key * BATCH + i for i in range(BATCH)]
    return Batch(vs, torch.from_numpy(np.stack([draw_masks(spec, s) for s in seeds])).bool())


def build(cfg, seed=0):
    from raysl.train.build import make_optimizer, make_schedules
    from raysl.train.engine import initialize
    from raysl.train.zero import build_method

    torch.manual_seed(seed)
    method = build_method(cfg)
    schedules = make_schedules(cfg, 10, 2)
    engine = initialize(method, make_optimizer(cfg, method, schedules), cfg)
    return engine, method, schedules


def step(built, cfg, s: int, rank: int) -> float:
    from raysl.train.trainer import train_step

    engine, method, schedules = built
    values = {**schedules.at(s), "step": s}
    torch.manual_seed(10_000 * (rank + 1) + s)  # MAE's masks: the same draws at every ZeRO stage
    out = train_step(engine, method, engine.optimizer, [inputs(cfg, s, rank)], values)
    return float(out["loss"].detach().float())


def drill_build(rank: int, out: dict) -> None:
    """Each method built partitioned: numel per worker, no whole tensor, initial weights."""
    from raysl.train.zero_gather import full_state_dict, local_numel

    for name in ("byol", "dino", "mae", *MASKED):
        torch.manual_seed(0)
        from raysl.train.zero import build_method

        method = build_method(cfg_for(name))
        mine, whole = local_numel(method)
        out[f"{name}/numel"] = (mine, whole)
        out[f"{name}/data_numel"] = sum(p.data.numel() for p in method.parameters())  # whole tensors held
        out[f"{name}/state"] = full_state_dict(method, keep=rank == 0)


def drill_train(rank: int, out: dict, directory: str) -> None:
    """BYOL under ZeRO-3: EMA by the formula, checkpoint (weights.safetensors gathered),
    val_loss, kNN features, exact resume."""
    from raysl.eval.monitor import gathered_features
    from raysl.train import checkpoint
    from raysl.train.val_loss import held_out_loss
    from raysl.train.zero_gather import full_state_dict

    cfg = cfg_for("byol")
    built = build(cfg)
    engine, method, schedules = built
    out["losses"] = [step(built, cfg, s, rank) for s in range(2)]
    # one EMA update by hand: teacher before, student after the optimizer step, teacher after.
    # Only the students are gathered in between (DeepSpeed releases what it gathered), so the
    # update meets teachers held whole next to students held as partitions only.
    values = {**schedules.at(2), "step": 2}
    teachers = full_state_dict(method, keep=rank == 0)  # not moved by the optimizer step
    loss = engine(views(2, rank), values)["loss"]
    engine.backward(loss)
    engine.step()
    out["ema/before"] = {k: v for k, v in teachers.items() if k.startswith("teacher_")}
    for name, child in method.named_children():
        if not name.startswith("teacher_"):
            out["ema/before"].update({f"{name}.{k}": v for k, v in full_state_dict(child, keep=rank == 0).items()})
    method.after_step({**values, "ema_momentum": 0.7})
    out["ema/after"] = full_state_dict(method, keep=rank == 0)
    # val_loss: twice the same, the same on every worker
    held = [views(100 + i, rank) for i in range(2)]
    out["val_loss"] = [held_out_loss(engine, method, held, values) for _ in range(2)]
    # kNN monitor features of the partitioned backbone
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (10, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)
    out["knn_features"] = gathered_features(method.backbone, images, batch_size=4)
    # step 3 as the training loop takes it (train_step: the EMA update right after the
    # optimizer step, nothing gathered in between), then the checkpoint
    out["train_step/before"] = full_state_dict(method, keep=rank == 0)
    step(built, cfg, 3, rank)
    checkpoint.save(
        directory, engine, rank=rank, world_size=2, state={"step": 4, "epoch": 0, "position": 0, "skipped": 0}
    )
    out["train_step/after"] = full_state_dict(method, keep=rank == 0)
    out["expected"] = [step(built, cfg, s, rank) for s in (4, 5)]
    fresh = build(cfg, seed=1)
    state = checkpoint.load(directory, fresh[0], rank=rank, world_size=2)
    out["resumed_step"] = state["step"]
    out["resumed"] = [step(fresh, cfg, s, rank) for s in (4, 5)]


def drill_methods(rank: int, out: dict) -> None:
    """DINO, MAE, iBOT, DINOv2 and I-JEPA (heads, decoders, predictors, external cls/pos
    params read outside the ViT's forward) train 2 steps partitioned, and the same 2 steps
    unpartitioned (ZeRO-0) from the same weights on the same inputs."""
    for name in ("dino", "mae", *MASKED):
        for zero in (3, 0):
            cfg = cfg_for(name, zero=zero)
            built = build(cfg)
            out[f"{name}/losses/zero{zero}"] = [step(built, cfg, s, rank) for s in range(2)]
        out[f"{name}/inputs"] = inputs(cfg, 0, rank)


DRILLS = {"build": drill_build, "train": drill_train, "methods": drill_methods}


def worker(rank: int, port: int, directory: str, drills: list[str]) -> None:
    from raysl.train.local_world import join_local_world

    torch.set_num_threads(1)
    join_local_world(rank, 2, port)
    out: dict = {}
    try:
        for d in drills:
            if d == "train":
                drill_train(rank, out, os.path.join(directory, "ckpt"))
            else:
                DRILLS[d](rank, out)
    except BaseException:
        out["error"] = traceback.format_exc()
    torch.save(out, os.path.join(directory, f"rank{rank}.pt"))
    dist.destroy_process_group()
