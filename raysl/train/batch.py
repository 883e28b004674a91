"""What one forward pass of a method takes: the normalised views of a micro-batch and,
for a method that declares a `mask_spec` (iBOT, DINOv2, I-JEPA), their patch masks as
the data pipeline drew them from each row's augmentation seed."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Batch(NamedTuple):
    views: list[torch.Tensor]
    masks: torch.Tensor | None = None  # (N, planes, rows, cols) bool (raysl.data.masks)


def forward(engine, batch: Batch | list[torch.Tensor], values: dict) -> dict:
    """The method's outputs for `batch` (a Batch, or a plain list of views)."""
    views, masks = batch if isinstance(batch, Batch) else (batch, None)
    return engine(views, values) if masks is None else engine(views, values, masks)
