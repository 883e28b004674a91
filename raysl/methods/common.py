"""Pieces the method classes share: backbones for multi-crop, EMA teachers, multi-crop
forward passes by resolution, and the collapse metric."""

from __future__ import annotations

import copy
import sys

import torch
import torch.nn.functional as F
from torch import nn

from raysl.models.backbone import create_backbone


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
    if multi_crop:
        try:
            return create_backbone(name, **common, dynamic_img_size=True, **({"img_size": size} if size else {}))
        except TypeError:  # not a ViT: no dynamic_img_size / img_size arguments
            pass
    return create_backbone(name, **common, img_size=size)


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


def make_teacher(module: nn.Module) -> nn.Module:
    """A frozen copy (requires_grad False): an EMA teacher / momentum encoder. Its
    parameters and buffers are part of the method's state dict, so checkpoints carry it."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def _data(p: torch.Tensor) -> torch.Tensor:
    # DeepSpeed ZeRO-3 keeps each worker's shard of a parameter in `ds_tensor` (p.data is
    # empty outside forward); teacher and student shapes match, so their shards line up.
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter
    (buffers, e.g. BN statistics, stay the teacher's own, as in MoCo/BYOL/DINO)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("EMA teacher and student have different parameter lists")
    m = float(momentum)
    for t, s in zip(t_params, s_params):
        td, sd = _data(t), _data(s)
        td.mul_(m).add_(sd.to(td.dtype), alpha=1.0 - m)


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


@torch.no_grad()
def embedding_std(z: torch.Tensor) -> torch.Tensor:
    """Std over the batch of the L2-normalised embeddings, averaged over dimensions:
    about 1/sqrt(d) when healthy, -> 0 when every image maps to the same point."""
    return F.normalize(z.detach().float(), dim=1).std(dim=0).mean()


def step_of(values: dict) -> int:
    return int(values.get("step", 0))
