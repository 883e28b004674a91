"""What the training engine knows about a method, and the registry of methods by name."""

from __future__ import annotations

import torch
from torch import nn

from raysl.errors import UserError

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    def wrap(cls):
        METHODS[name] = cls
        cls.name = name
        return cls

    return wrap


class Method(nn.Module):
    """A backbone plus heads plus a loss. The engine calls `forward(views, values)` with
    the normalised views of one batch and the schedule values of this step, and expects
    a dict with a scalar "loss" (other scalars are logged). `after_step` runs after each
    optimizer step (EMA teachers, queues). All state lives in parameters and buffers, so
    it travels in checkpoints."""

    name = "?"
    default_views = "simclr"

    def forward(self, views: list[torch.Tensor], values: dict[str, float]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def after_step(self, values: dict[str, float]) -> None:
        pass


def method_class(name: str) -> type[Method]:
    import raysl.methods.simclr  # noqa: F401  (registers)

    if name not in METHODS:
        raise UserError(f"config key method.name: {name!r} is not a method; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def build_method(cfg) -> Method:
    return method_class(cfg.method.name)(cfg)
