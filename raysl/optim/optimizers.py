"""Optimizers: parameter groups with/without weight decay, and the libraries' optimizers.

Every optimizer the trainer uses is built here: `param_groups(model, wd)` then
`build_optimizer(name, groups, lr=...)`. Groups carry `wd_scale` (1.0 or 0.0) so a
weight-decay schedule sets `group["weight_decay"] = wd_scale * wd_now`
(see `raysl.optim.schedules.apply`), and `lars_exclude` (True for norms, biases and
tokens) so LARS/LAMB leave those out of their trust-ratio adaptation, as SimCLR/DINO do.
"""

from __future__ import annotations

import torch

from raysl.errors import UserError

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb", "adamw8bit", "lion8bit", "paged_adamw8bit", "paged_lion8bit")


def _no_weight_decay_names(model: torch.nn.Module) -> set[str]:
    """Full parameter names that a (sub)module lists in its `no_weight_decay()` (timm style),
    so a backbone wrapped inside a method (`backbone.pos_embed`) is still found."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        fn = getattr(module, "no_weight_decay", None)
        if callable(fn):
            for n in fn():
                names.add(f"{prefix}.{n}" if prefix else n)
    return names


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two groups over the trainable parameters: decayed weights, and no-decay
    (ndim <= 1: norms and biases, plus names from `no_weight_decay()`, e.g. ViT pos_embed/cls_token).
    Empty groups are left out."""
    if weight_decay < 0:
        raise UserError(f"weight_decay must be >= 0, got {weight_decay}")
    skip = _no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # a ZeRO-3 partitioned parameter's p.data is an empty 1-D tensor: its shape is ds_shape
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.ndim
        if ndim <= 1 or name in skip:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "wd_scale": 1.0, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "wd_scale": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(
    name: str,
    groups: list[dict],
    *,
    lr: float,
    betas: tuple[float, float] | None = None,
    momentum: float = 0.9,
    eps: float = 1e-8,
    cpu_offload: bool = False,
) -> torch.optim.Optimizer:
    """Build optimizer `name` over `groups` (from `param_groups`).

    `cpu_offload` (deepspeed.offload_optimizer cpu/nvme): AdamW as DeepSpeed's
    DeepSpeedCPUAdam (adamw_mode), the optimizer ZeRO-Offload steps on the host; the only
    one raysl offloads (engine.check_config refuses the others).

    betas=None takes the optimizer's usual default: (0.9, 0.999) for the Adam family and LAMB,
    (0.9, 0.99) for Lion. `momentum` is for sgd/lars; `eps` for adam-family/lamb/lars.
    """
    if name not in OPTIMIZERS:
        raise UserError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    if lr < 0:
        raise UserError(f"lr must be >= 0, got {lr}")
    if name.startswith("paged_") and not torch.cuda.is_available():
        raise UserError(
            f"optimizer {name!r} needs a CUDA GPU (paged state lives in CUDA unified memory); "
            f"on this machine use {name.removeprefix('paged_')!r}, e.g. optimizer: adamw8bit"
        )
    adam_betas = betas if betas is not None else (0.9, 0.999)
    lion_betas = betas if betas is not None else (0.9, 0.99)
    # LARS/LAMB adapt a group when its weight_decay != 0 or always_adapt: adapt weights always
    # (even if wd is 0 or scheduled to 0), never norms/biases (their weight_decay is 0).
    groups = [
        {**g, "always_adapt": not g.get("lars_exclude", False)} if name in ("lars", "lamb") else dict(g) for g in groups
    ]

    if cpu_offload and name != "adamw":
        raise UserError(f"optimizer {name!r} cannot be offloaded; deepspeed.offload_optimizer takes optim.name=adamw")
    if name == "adamw" and cpu_offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=adam_betas, eps=eps, adamw_mode=True)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=adam_betas, eps=eps)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from timm.optim import Lars

        return Lars(groups, lr=lr, momentum=momentum, eps=eps)
    if name == "lamb":
        from timm.optim import Lamb

        # gradient clipping is the trainer's job (DeepSpeed gradient_clipping), not LAMB's
        return Lamb(groups, lr=lr, betas=adam_betas, eps=eps, max_grad_norm=None)

    import bitsandbytes.optim as bnb

    if name == "adamw8bit":
        return bnb.AdamW8bit(groups, lr=lr, betas=adam_betas, eps=eps)
    if name == "paged_adamw8bit":
        return bnb.PagedAdamW8bit(groups, lr=lr, betas=adam_betas, eps=eps)
    if name == "lion8bit":
        return bnb.Lion8bit(groups, lr=lr, betas=lion_betas)
    return bnb.PagedLion8bit(groups, lr=lr, betas=lion_betas)


def optimizer_state_bytes(optimizer) -> int:
    """Bytes held by all tensors in `optimizer.state` (8-bit state, absmax and quantisation
    maps included). A tensor shared by several params (bitsandbytes' qmaps) counts once.
    A wrapper with an inner `.optimizer` (DeepSpeed) is unwrapped."""
    while not hasattr(optimizer, "state") and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    seen: set[tuple[int, int]] = set()
    total = 0
    for state in optimizer.state.values():
        for v in state.values():
            if not torch.is_tensor(v):
                continue
            nbytes = v.numel() * v.element_size()
            key = (v.data_ptr(), nbytes)
            if nbytes and key in seen:
                continue
            seen.add(key)
            total += nbytes
    return total
