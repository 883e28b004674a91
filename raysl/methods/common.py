"""Pieces the method classes share: backbones for multi-crop, multi-crop forward passes by
resolution, the collapse metrics, and what DINO's family (DINO, iBOT, DINOv2) builds alike
(EMA teachers: raysl.methods.teacher)."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from raysl.models.backbone import TimmModel, create_backbone
from raysl.models.heads import DINOHead
from raysl.models.tokens import ViT


def is_vit(backbone: nn.Module) -> bool:
    """A timm ViT-like model: patch embedding, absolute position embedding, blocks, norm."""
    return (
        all(hasattr(backbone, a) for a in ("patch_embed", "blocks", "norm"))
        and getattr(backbone, "pos_embed", None) is not None
    )


def make_backbone(cfg, *, multi_crop: bool = False) -> nn.Module:
    """The backbone of `cfg.model`. With `multi_crop`, ViTs are built with
    `dynamic_img_size=True` so crops of other sizes (DINO/SwAV local crops) interpolate the
    position embedding; convnets take any size anyway."""
    name, size = cfg.model.backbone, cfg.data.image_size or None
    common = dict(drop_path_rate=cfg.model.drop_path_rate, global_pool=cfg.model.global_pool)
    backbone = None
    if multi_crop:
        try:
            backbone = create_backbone(name, **common, dynamic_img_size=True, **({"img_size": size} if size else {}))
        except TypeError:  # not a ViT: no dynamic_img_size / img_size arguments
            pass
    if backbone is None:
        backbone = create_backbone(name, **common, img_size=size)
    if getattr(cfg.model, "grad_checkpointing", False):
        grad_checkpointing(backbone, name)
    return backbone


def meta_vit(cfg, method: str) -> ViT:
    """`cfg.model.backbone` built on the meta device (no memory, no weights), for its patch
    size and grid; a UserError naming model.backbone unless it is a timm ViT."""
    from raysl.models.mae import check_vit

    with torch.device("meta"):
        backbone = make_backbone(cfg)
    check_vit(backbone, cfg.model.backbone, method)
    return backbone


def grad_checkpointing(backbone: TimmModel, name: str) -> None:
    """`model.grad_checkpointing=true`: timm's activation checkpointing of the backbone's
    blocks (each block's activations are recomputed in backward instead of kept)."""
    from raysl.errors import UserError

    try:
        backbone.set_grad_checkpointing(True)
        ok = getattr(backbone, "grad_checkpointing", True) is not False
    except (AssertionError, NotImplementedError, AttributeError):
        ok = False
    if not ok:
        raise UserError(
            f"config key model.grad_checkpointing: timm model {name!r} has no activation checkpointing "
            "(set_grad_checkpointing); set model.grad_checkpointing=false or pick a backbone that has it "
            "(timm's ViTs, ResNets, ConvNeXts, ...)"
        )


def register_external_params(owner: nn.Module, module: nn.Module) -> None:
    """Tell DeepSpeed ZeRO-3 that `owner.forward` reads `module`'s own (non-recursive)
    parameters directly, e.g. a ViT's cls_token / pos_embed used outside the ViT's own
    forward (MAE, saliency maps), so it gathers them around `owner`'s forward and backward.
    A no-op unless DeepSpeed is loaded; harmless for ZeRO stages 0-2."""
    if "deepspeed" not in sys.modules:
        return
    from deepspeed.runtime.zero import register_external_parameter

    for _, p in module.named_parameters(recurse=False):
        register_external_parameter(owner, p)


def multicrop(fn, views: list[torch.Tensor]) -> list:
    """`fn` applied to every view, one call per run of consecutive views with the same
    resolution (global crops together, local crops together, as DINO/SwAV do), split back
    into one output per view. `fn` may return a tensor or a tuple of tensors."""
    outs: list = []
    i = 0
    while i < len(views):
        j = i
        while j < len(views) and views[j].shape[-2:] == views[i].shape[-2:]:
            j += 1
        y = fn(torch.cat(views[i:j]) if j - i > 1 else views[i])
        sizes = [v.shape[0] for v in views[i:j]]
        if isinstance(y, tuple):
            outs += list(zip(*(part.split(sizes) for part in y)))
        else:
            outs += list(y.split(sizes))
        i = j
    return outs


def batch_independent(module: nn.Module) -> bool:
    """True when no layer of `module` mixes the images of a batch (no batch norm), so one
    call on concatenated views gives each view what a call of its own would."""
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


def encode_views(backbone: nn.Module, views: list[torch.Tensor]) -> list[torch.Tensor]:
    """The backbone's features of each view: one call over views of the same resolution
    when the backbone is batch-independent (ViTs), else one call per view (a ResNet's batch
    norm keeps per-view statistics, as lightly's methods do). One call matters under
    ZeRO-3: each parameter's gradient is produced and reduce-scattered once per step,
    instead of a model's worth of gradients waiting for the second view's backward."""
    if batch_independent(backbone):
        return multicrop(backbone, views)
    return [backbone(v) for v in views]


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Std over the batch of the L2-normalised embeddings, averaged over dimensions:
    about 1/sqrt(d) when healthy, -> 0 when every image maps to the same point."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def step_of(values: dict) -> int:
    return int(values.get("step", 0))


def dino_head(in_dim: int, out_dim: int, m) -> DINOHead:
    """The DINO head of the method config `m` (proj_hidden_dim, proj_dim, proj_layers
    (0: 3), norm_last_layer) from `in_dim` features to `out_dim` prototypes."""
    return DINOHead(
        in_dim,
        out_dim,
        hidden_dim=m.proj_hidden_dim,
        bottleneck_dim=m.proj_dim,
        layers=m.proj_layers or 3,
        norm_last_layer=m.norm_last_layer,
    )


def teacher_temp_schedule(m, total_steps: int) -> np.ndarray:
    """DINO's teacher temperature per step: linear from teacher_temp_warmup to teacher_temp
    over teacher_temp_warmup_steps, then constant."""
    from raysl.optim.schedules import linear_then_constant

    warmup = min(m.teacher_temp_warmup_steps, total_steps - 1)
    return linear_then_constant(m.teacher_temp_warmup, m.teacher_temp, warmup, total_steps)


@torch.no_grad()
def teacher_entropies(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse metrics of teacher probabilities p (N, K), as fractions of log K: the mean
    entropy per row (-> 1: uniform collapse) and the entropy of the mean row (-> 0: one
    prototype for every image)."""
    log_k = math.log(p.shape[-1])
    mean_p = p.mean(0)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1).mean() / log_k
    return entropy, -(mean_p * torch.log(mean_p.clamp_min(1e-12))).sum() / log_k
