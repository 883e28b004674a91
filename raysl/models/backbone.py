"""Backbones: any timm model by name, random init (nothing is ever downloaded)."""

from __future__ import annotations

import difflib
from typing import Any

import timm
import torch

from raysl.errors import UserError

# A timm model: its own methods (forward_features, reset_classifier, set_grad_checkpointing,
# ...) are called by name, and nn.Module's type knows none of them.
TimmModel = Any


def check_backbone_name(name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see timm.list_models()"
        raise UserError(f"config key model.backbone: {name!r} is not a timm model{hint}")


def create_backbone(
    name: str, *, drop_path_rate: float = 0.0, img_size: int | None = None, global_pool: str = "", **extra
) -> torch.nn.Module:
    """A timm model without its classifier (`num_classes=0`): forward gives pooled
    features of size `model.num_features`. ViT-like models get `img_size` when given;
    `global_pool` ("" = the model's default) picks the pooling."""
    check_backbone_name(name)
    kwargs = dict(pretrained=False, num_classes=0, drop_path_rate=drop_path_rate, **extra)
    if global_pool:
        kwargs["global_pool"] = global_pool
    if img_size:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError:  # convnets take any input size and have no img_size argument
            pass
    return timm.create_model(name, **kwargs)
