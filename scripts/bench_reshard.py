"""Seconds to reshard a ZeRO-2 AdamW8bit checkpoint of a ViT-L-sized model from 2 workers to 1
on this machine's CPU, through raysl.train.reshard's own code path (file reads,
dequantisation, the cut, requantisation with the optimizer's qmaps), and the bytes the
layout adds to raysl_state.json.

The old workers' files are written here in DeepSpeed's ZeRO-2 format from real
bitsandbytes AdamW8bit state (one step on random gradients); the new worker is a stand-in
for DeepSpeed's ZeRO-2 optimizer holding the attributes the resharder reads (building a
300 M-parameter DeepSpeed engine on 2 shared CPU cores would time the build, not the
resharding).

    python scripts/bench_reshard.py --numel 304000000 --dir /tmp/reshard_bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch


def groups_of(numel: int) -> list[int]:
    return [numel - numel // 1000, numel // 1000]  # ViT: nearly all in the decayed weights


def write_old(directory: str, numels: list[int], world: int) -> None:
    import bitsandbytes.optim as bnb
    from deepspeed.checkpoint import constants as c
    from deepspeed.runtime.fp16.loss_scaler import LossScaler

    os.makedirs(os.path.join(directory, "engine"), exist_ok=True)
    for k in range(world):
        parts, paddings = [], []
        for n in numels:
            aligned = math.ceil(n / (2 * world)) * 2 * world
            size = aligned // world
            real = max(0, min(size, n - k * size))
            parts.append(torch.randn(size) * 0.02)
            paddings.append(size - real)
        opt = bnb.AdamW8bit([{"params": [p]} for p in parts], lr=1e-3)
        for p in parts:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        sd = {
            c.LOSS_SCALER: LossScaler(1.0),
            "dynamic_loss_scale": False,
            "overflow": False,
            c.CLIP_GRAD: 1.0,
            c.BASE_OPTIMIZER_STATE: opt.state_dict(),
            c.SINGLE_PARTITION_OF_FP32_GROUPS: [p[: p.numel() - pad] for p, pad in zip(parts, paddings, strict=True)],
            c.GROUP_PADDINGS: paddings,
            c.PARAM_ALIGNMENT_PADDINGS: [[0] for _ in numels],
            c.PARTITION_COUNT: [world] * len(numels),
            c.DS_VERSION: "0.19.0",
        }
        torch.save(
            {"optimizer_state_dict": sd},
            os.path.join(directory, "engine", f"zero_pp_rank_{k}_mp_rank_00_optim_states.pt"),
        )
        del opt, parts, sd


class _NewZero2:
    """What raysl.train.reshard reads of DeepSpeed's ZeRO-2 optimizer, for one worker of `world`."""

    def __init__(self, numels: list[int], rank: int, world: int):
        import bitsandbytes.optim as bnb

        self.partition_size = [math.ceil(n / (2 * world)) * 2 for n in numels]
        self.single_partition_of_fp32_groups = [torch.zeros(p) for p in self.partition_size]
        self.round_robin_bit16_meta = [[torch.empty(n, device="meta")] for n in numels]
        self.round_robin_bit16_padding = [[0] for _ in numels]
        self.optimizer = bnb.AdamW8bit([{"params": [p]} for p in self.single_partition_of_fp32_groups], lr=1e-3)
        self._hp_optimizer_states_linked = True

    def _load_global_state(self, sd):
        pass

    def _link_all_hp_params(self):
        pass

    def _lazy_init_hp_params_optimizer_state(self):
        pass


class _Engine:
    def __init__(self, optimizer):
        self.optimizer = optimizer

    def bfloat16_enabled(self):
        return False


def main() -> None:
    from raysl.train.checkpoint import safe_load
    from raysl.train.reshard import _Zero12, _zero_files

    ap = argparse.ArgumentParser()
    ap.add_argument("--numel", type=int, default=304_000_000)
    ap.add_argument("--dir", default="/tmp/reshard_bench")
    ap.add_argument("--old", type=int, default=2)
    args = ap.parse_args()
    numels = groups_of(args.numel)
    if not os.path.exists(os.path.join(args.dir, "engine", f"zero_pp_rank_{args.old - 1}_mp_rank_00_optim_states.pt")):
        t = time.perf_counter()
        write_old(args.dir, numels, args.old)
        print(f"wrote the old checkpoint in {time.perf_counter() - t:.1f} s")
    engine = _Engine(_NewZero2(numels, 0, 1))
    t = time.perf_counter()
    _Zero12(args.dir, _zero_files(args.dir, "engine", engine, args.old, safe_load), engine, args.old, 0, 1).restore()
    seconds = time.perf_counter() - t
    size = sum(
        os.path.getsize(os.path.join(args.dir, "engine", n)) for n in os.listdir(os.path.join(args.dir, "engine"))
    )
    layout = {"stage": 2, "groups": [{"extent": n, "base": n} for n in numels]}
    print(
        json.dumps(
            {
                "params": args.numel,
                "old_workers": args.old,
                "new_workers": 1,
                "optimizer_files_bytes": size,
                "reshard_seconds": round(seconds, 2),
                "seconds_per_million_params": round(seconds / args.numel * 1e6, 4),
                "layout_bytes_zero2": len(json.dumps(layout)),
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
