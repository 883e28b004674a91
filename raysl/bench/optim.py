"""`raysl bench optim`: optimizer state memory per parameter, fp32 AdamW vs 8-bit.

Builds each optimizer through the trainer's code path (param_groups + build_optimizer),
gives every parameter a random gradient, takes one step so the state exists, and reports
optimizer_state_bytes / number of trainable params. Memory only; nothing is timed.
"""

from __future__ import annotations

import argparse

import torch

from raysl.optim.optimizers import build_optimizer, optimizer_state_bytes, param_groups


def _fp32_state_params(optimizer) -> int:
    """Params whose state stays 32-bit in a bitsandbytes 8-bit optimizer (< min_8bit_size)."""
    return sum(
        p.numel()
        for p, s in optimizer.state.items()
        if torch.is_tensor(s.get("state1")) and s["state1"].dtype == torch.float32
    )


def run_optim_bench(
    model: str = "vit_base_patch16_224", optimizers=("adamw", "adamw8bit"), weight_decay: float = 0.05, seed: int = 0
) -> dict:
    import timm

    torch.manual_seed(seed)
    net = timm.create_model(model, pretrained=False)
    params = [p for p in net.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    out: dict = {"bench": "optim", "model": model, "params": n}
    for name in optimizers:
        opt = build_optimizer(name, param_groups(net, weight_decay), lr=1e-4)
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        out[f"{name}_bytes_per_param"] = round(optimizer_state_bytes(opt) / n, 4)
        if "8bit" in name:
            out[f"{name}_fp32_state_params"] = _fp32_state_params(opt)
        del opt
        for p in params:
            p.grad = None
    if "adamw" in optimizers and "adamw8bit" in optimizers:
        out["ratio"] = round(out["adamw8bit_bytes_per_param"] / out["adamw_bytes_per_param"], 4)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model (random init) whose parameters are used")


def run_from_args(args: argparse.Namespace) -> dict:
    return run_optim_bench(args.model)
