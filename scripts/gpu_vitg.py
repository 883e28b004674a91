"""Throughput, memory and MFU of a 1 B-parameter ViT pretraining on one GPU, 8-bit against fp32 AdamW state.

ViT-g/14 (timm vit_giant_patch14_224) at 224 px on one GPU: SimCLR (2 views), bf16,
ZeRO-3 (built partitioned by raysl.train.zero), activation checkpointing, through raysl's
engine and train_step; 5 warmup + 20 timed steps, once with AdamW8bit and once with fp32
AdamW state. Prints one JSON line per optimizer: images/s, peak CUDA memory, MFU.

MFU = model FLOPs per second / 790e12 (H200 dense bf16). Model FLOPs per image and view:
3 x forward (forward + backward), forward = 2 x matmul params x tokens + attention
(4 x tokens^2 x width x depth); checkpointing's recomputation is not counted (as usual).

    python scripts/gpu_vitg.py --batch-size 32     # one GPU: two model builds, 2 x 25 steps
"""

from __future__ import annotations

import argparse
import json
import os
import time

PEAK_FLOPS = 790e12


def model_flops_per_view(backbone, image_size: int) -> float:
    patch = backbone.patch_embed.patch_size[0]
    tokens = (image_size // patch) ** 2 + getattr(backbone, "num_prefix_tokens", 1)
    width, depth = backbone.embed_dim, len(backbone.blocks)
    matmul = sum(p.numel() for n, p in backbone.named_parameters() if p.dim() == 2 and "blocks" in n)
    return 3 * (2 * matmul * tokens + 4 * tokens**2 * width * depth)


def run(optimizer: str, batch_size: int, image_size: int, steps: int, warmup: int) -> dict:
    import timm
    import torch

    from raysl.config import from_dict
    from raysl.train.build import build
    from raysl.train.trainer import train_step

    cfg = from_dict(
        {
            "data": {"batch_size": batch_size, "image_size": image_size},
            "model": {"backbone": "vit_giant_patch14_224", "grad_checkpointing": True},
            "method": {"name": "simclr"},
            "optim": {"name": optimizer, "lr": 1e-4},
            "deepspeed": {"zero_stage": 3, "precision": "bf16"},
            "train": {"gpus_per_worker": 1},
        }
    )
    torch.cuda.reset_peak_memory_stats()
    built = build(cfg, world_size=1, total_steps=steps + warmup + 1)
    method, schedules, opt, engine = built.method, built.schedules, built.optimizer, built.engine
    views = [torch.randn(batch_size, 3, image_size, image_size, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    times = []
    for s in range(warmup + steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = train_step(engine, method, opt, [views], {**schedules.at(s), "step": s})
        float(out["loss"])
        torch.cuda.synchronize()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = sorted(times)[len(times) // 2]
    ref = timm.create_model(
        "vit_giant_patch14_224", num_classes=0, img_size=image_size, pretrained=False, device="meta"
    )
    flops = model_flops_per_view(ref, image_size) * 2 * batch_size
    return {
        "optimizer": optimizer,
        "batch_size": batch_size,
        "image_size": image_size,
        "step_s_median": round(step_s, 3),
        "images_per_s": round(batch_size / step_s, 1),
        "peak_cuda_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "mfu": round(flops / step_s / PEAK_FLOPS, 4),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--optimizers", nargs="+", default=["adamw8bit", "adamw"])
    a = p.parse_args()
    import torch.distributed as dist

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1")
    dist.init_process_group("nccl", rank=0, world_size=1)
    for name in a.optimizers:
        print(json.dumps(run(name, a.batch_size, a.image_size, a.steps, a.warmup)), flush=True)


if __name__ == "__main__":
    main()
