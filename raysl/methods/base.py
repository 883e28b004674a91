"""What the training engine knows about a method, and the registry of methods by name.

A method is one module in `raysl/methods/` (or in another package, named by a
`raysl.methods` entry point): a `Method` subclass decorated with `@register(name)` that
declares its config keys, views, crop needs, schedules and short-run bench settings. The
registry imports every module of this package, so no list of methods is kept by hand."""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points

import numpy as np
import torch
from torch import nn

from raysl.data.masks import BlockMasks, MultiBlockMasks
from raysl.errors import UserError
from raysl.methods.keys import EMAKeys, MethodConfig

METHODS: dict[str, type[Method]] = {}


def register(name: str):
    def wrap(cls):
        if name in METHODS and METHODS[name] is not cls:
            raise RuntimeError(f"two methods are registered as {name!r}: {METHODS[name].__module__}, {cls.__module__}")
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


class Method(nn.Module):
    """A backbone plus heads plus a loss. The engine calls `forward(views, values)` with
    the normalised views of one batch and the schedule values of this step, and expects
    a dict with a scalar "loss" (other scalars are logged). `after_step` runs after each
    optimizer step: here it moves the EMA teachers the method declared with
    `raysl.methods.teacher.add_teacher` (momentum: the `ema_momentum` schedule value);
    a method that overrides it calls `super().after_step(values)`. All state lives in
    parameters and buffers, so it travels in checkpoints."""

    name = "?"
    config_class: type[MethodConfig] = MethodConfig  # its `method.*` keys (raysl.methods.keys)
    backbone_module = "backbone"  # the attribute holding the network that eval and export use
    default_views = "simclr"  # the views preset (raysl.data.views) when data.views is empty
    embedding_dim = 0  # size of the vector behind "embedding_std" (for collapse_warning)
    # The crops it can use (checked against the data.* crop keys before Ray starts):
    global_crops: tuple[int, int | None] = (2, 2)  # (least, most) global crops; most None: no limit
    uses_local_crops = False  # multi-crop: smaller local crops after the global ones
    min_crops = 1  # global + local crops, at least
    local_smaller = False  # local crops must differ in size from global ones (told apart by size)
    # `raysl bench methods`: overrides for a short CPU run on 32 px digits that learns
    bench_overrides: tuple[str, ...] = ()
    # Teacher attribute prefixes of checkpoints written before raysl.methods.teacher (e.g.
    # BYOL's "target_"): their keys load as teacher_* (see `_load_legacy_teachers`).
    legacy_teacher_prefixes: tuple[str, ...] = ()

    def __init__(self, cfg=None):  # subclasses build their modules from the run's Config
        super().__init__()
        self._register_load_state_dict_pre_hook(self._load_legacy_teachers)

    def _load_legacy_teachers(self, state_dict, prefix, *args) -> None:
        from raysl.methods.teacher import rename_legacy_keys

        rename_legacy_keys(state_dict, prefix, self.legacy_teacher_prefixes)

    def forward(
        self, views: list[torch.Tensor], values: dict[str, float], masks: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """`masks`: with a `mask_spec`, the batch's patch masks (N, planes, rows, cols) bool."""
        raise NotImplementedError

    def after_step(self, values: dict[str, float]) -> None:
        from raysl.methods.teacher import ema_update_all

        if getattr(self, "teacher_pairs", None):
            ema_update_all(self, values["ema_momentum"])

    def draw(self, out: dict, step: int, folder: str) -> None:
        """Rank 0, after each step: pictures of the step's outputs into the run's `folder`."""

    def evaluated_backbone(self) -> nn.Module:
        return getattr(self, self.backbone_module)

    @classmethod
    def check_config(cls, cfg) -> None:
        """Raise UserError for a config this method cannot run (called before Ray starts)."""

    @classmethod
    def mask_spec(cls, cfg, spec) -> BlockMasks | MultiBlockMasks | None:
        """The patch masks the method needs with its views (drawn per row in the data pipeline), or None."""
        return None

    @classmethod
    def schedules(cls, m: MethodConfig, total_steps: int) -> dict[str, np.ndarray]:
        """Per-step values the method reads from `values` besides lr and weight_decay, one
        per optimizer step. A method with an EMA teacher gets "ema_momentum" (cosine)."""
        from raysl.optim.schedules import cosine

        if isinstance(m, EMAKeys):
            return {"ema_momentum": cosine(m.ema_momentum, m.ema_momentum_end, total_steps)}
        return {}


def discover() -> dict[str, type[Method]]:
    """Every registered method: the modules of this package, then `raysl.methods` entry points."""
    import raysl.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
    for ep in entry_points(group="raysl.methods"):
        ep.load()
    return METHODS


def method_class(name: str) -> type[Method]:
    methods = discover()
    if name not in methods:
        raise UserError(f"config key method.name: {name!r} is not a method; known: {', '.join(sorted(methods))}")
    return methods[name]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)


def collapse_warning(metrics: dict, dim: int) -> str | None:
    """A loud message when the logged metrics show representation collapse, else None.

    - "embedding_std" (std over the batch of L2-normalised embeddings, averaged over the
      `dim` dimensions; every method returns it): healthy ~ 1/sqrt(dim), collapsed -> 0.
      Fires below 0.1/sqrt(dim).
    - DINO's "teacher_entropy" (mean entropy of the teacher's softmax per image, as a
      fraction of log K): fires above 0.99 (uniform collapse: the teacher says nothing);
      "teacher_mean_entropy" (entropy of the batch-averaged teacher softmax, fraction of
      log K): fires below 0.02 (one prototype wins for every image).
    `dim` is the method's `embedding_dim`.
    """
    msgs = []
    std = metrics.get("embedding_std")
    if std is not None and dim > 0:
        std, limit = float(std), 0.1 / dim**0.5
        if not std >= limit:  # also catches NaN
            msgs.append(
                f"embedding_std {std:.2e} < 0.1/sqrt({dim}) = {limit:.2e} (healthy ~ {1 / dim**0.5:.2e}): "
                "the embeddings have collapsed to (nearly) one point"
            )
    ent = metrics.get("teacher_entropy")
    if ent is not None and float(ent) > 0.99:
        msgs.append(f"teacher_entropy {float(ent):.3f} of log K: the teacher's outputs are uniform (collapse)")
    mean_ent = metrics.get("teacher_mean_entropy")
    if mean_ent is not None and float(mean_ent) < 0.02:
        msgs.append(
            f"teacher_mean_entropy {float(mean_ent):.3f} of log K: one prototype dominates every image (collapse)"
        )
    if not msgs:
        return None
    step = metrics.get("step")
    at = f" at step {step}" if step is not None else ""
    return (
        f"!!! COLLAPSE WARNING{at}: " + "; ".join(msgs) + " -- check lr, temperatures, EMA momentum and augmentations"
    )
