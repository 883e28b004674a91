"""The training engine, assembled in one place: the trainer, `raysl bench step/memory/e2e`
and scripts/gpu_vitg.py all build what they train through `build`.

`build` seeds torch (the same initial weights on every worker), builds the method
(partitioned inside `deepspeed.zero.Init` under ZeRO-3, raysl.train.zero), compiles its
backbone where `model.compile` asks, then makes the per-step schedules, the optimizer
and the DeepSpeed engine around them. `worker_seed` is the seed of each worker's own
randomness (drop-path, masks, augmentation) once the weights are built."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from raysl.config import Config
from raysl.methods.base import Method, method_class
from raysl.optim.optimizers import build_optimizer, param_groups
from raysl.optim.schedules import Schedules, scaled_lr
from raysl.train.engine import initialize
from raysl.train.steps import global_batch
from raysl.train.zero import build_method


@dataclass
class Built:
    method: Method
    schedules: Schedules
    optimizer: torch.optim.Optimizer
    engine: Any  # deepspeed's DeepSpeedEngine around `method`; None when built with deepspeed=False


def build(
    cfg: Config,
    *,
    world_size: int,
    total_steps: int,
    deepspeed: bool = True,
    on_method: Callable[[Method], None] | None = None,
) -> Built:
    """What one worker of a `world_size`-worker run of `total_steps` steps trains. Every
    worker must call it (under ZeRO-3 the build is collective). `deepspeed=False`: no
    engine, and the method built whole (a plain PyTorch loop, as the benches' baselines
    run). `on_method`: called with the built method before the optimizer and the engine
    exist (`raysl bench memory` measures there)."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every worker
    method = build_method(cfg) if deepspeed else method_class(cfg.method.name)(cfg)
    if cfg.model.compile:
        compile_backbone(method.evaluated_backbone(), backend=cfg.model.compile_backend)
    if on_method is not None:
        on_method(method)
    schedules = make_schedules(cfg, total_steps, world_size)
    optimizer = make_optimizer(cfg, method, schedules)
    engine = initialize(method, optimizer, cfg) if deepspeed else None
    return Built(method, schedules, optimizer, engine)


def worker_seed(seed: int, rank: int) -> int:
    """The seed of worker `rank`'s own randomness (drop-path, masks, augmentation), apart
    from the run's `seed` that made the initial weights."""
    return seed * 1000 + rank + 1


def make_schedules(cfg: Config, total: int, world_size: int) -> Schedules:
    """The run's per-step schedules: lr (linearly scaled to the global batch) with warmup
    and cosine, weight decay, and the method's own (`Method.schedules`)."""
    wd_end = cfg.optim.weight_decay_end if cfg.optim.weight_decay_end >= 0 else cfg.optim.weight_decay
    return Schedules.build(
        total_steps=total,
        warmup_steps=min(cfg.optim.warmup_steps, total - 1),
        lr=scaled_lr(cfg.optim.lr, global_batch(cfg, world_size)),
        min_lr=cfg.optim.min_lr,
        weight_decay=cfg.optim.weight_decay,
        weight_decay_end=wd_end,
        method=method_class(cfg.method.name).schedules(cfg.method, total),
    )


def make_optimizer(cfg: Config, method: torch.nn.Module, schedules: Schedules) -> torch.optim.Optimizer:
    """The plain torch/bitsandbytes optimizer over the method's param groups, before DeepSpeed wraps it."""
    return build_optimizer(
        cfg.optim.name,
        param_groups(method, cfg.optim.weight_decay),
        lr=float(schedules.lr[0]),  # a numpy scalar in param_groups would make a checkpoint unloadable (weights_only)
        betas=(cfg.optim.beta1, cfg.optim.beta2),
        momentum=cfg.optim.momentum,
        cpu_offload=cfg.deepspeed.offload_optimizer != "none",  # ZeRO-Offload: DeepSpeedCPUAdam
    )


def compile_backbone(backbone: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """`model.compile=true`: compile the backbone in place (`nn.Module.compile`), so its
    state-dict keys stay those of the eager model (no `_orig_mod.` prefix) and
    checkpoints, weights.safetensors and exports are the same either way."""
    backbone.compile(backend=backend)
    return backbone
