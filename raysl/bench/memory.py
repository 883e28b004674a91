"""`raysl bench memory`: peak memory per worker for each ZeRO stage x optimizer (x offload).

For one backbone, every configuration runs in 2 fresh worker processes (a gloo world of
2 on the CPU, NCCL with one GPU each where there are GPUs: what Ray Train gives its
workers, without Ray's own processes in the numbers) that do what a training worker
does: build the method (partitioned under ZeRO-3), the optimizer and the DeepSpeed
engine (`raysl.train.build.build`), then `steps` optimizer steps
(`raysl.train.trainer.train_step`) on fixed random views. Each worker
reports its peak resident memory (`ru_maxrss`, CPU) or peak CUDA memory
(`max_memory_allocated`, GPU), and its resident memory after the imports, before the
model (`base_rss_mib`: the interpreter, torch, DeepSpeed, timm; the same in every
configuration). One JSON line per configuration, then a table with each configuration's
peak as a ratio of ZeRO-0 + AdamW's, measured in the same run.

The method is SimCLR (backbone + small projector) so the numbers are the backbone's;
fp32 unless --precision bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from raysl.train.local_world import free_port

DEFAULT_CONFIGS = (
    "0:adamw",
    "0:adamw8bit",
    "2:adamw",
    "2:adamw8bit",
    "2:adamw:cpu",
    "3:adamw",
    "3:adamw8bit",
    "3:adamw:cpu",
)


def parse_config(text: str) -> dict:
    """`ZERO:OPTIMIZER[:OFFLOAD[:PRECISION]]`: offload none/cpu (optimizer state; under
    ZeRO-3 the parameters too), precision fp32/bf16 ("": --precision)."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4) or parts[0] not in ("0", "1", "2", "3"):
        from raysl.errors import UserError

        raise UserError(
            f"--configs {text!r}: expected ZERO:OPTIMIZER[:OFFLOAD[:PRECISION]], e.g. 3:adamw8bit, 2:adamw:cpu "
            "or 3:adamw8bit:none:bf16"
        )
    parts += [""] * (4 - len(parts))
    return {"zero": int(parts[0]), "optimizer": parts[1], "offload": parts[2] or "none", "precision": parts[3]}


def _config(
    backbone: str,
    image_size: int,
    batch_size: int,
    c: dict,
    precision: str,
    grad_checkpointing: bool,
    reduce_bucket_size: int = 0,
    sub_group_size: int = 0,
    max_live_parameters: int = 0,
):
    from raysl.config import from_dict

    offload = c["offload"]
    return from_dict(
        {
            "data": {"batch_size": batch_size, "image_size": image_size},
            "model": {"backbone": backbone, "grad_checkpointing": grad_checkpointing},
            "method": {"name": "simclr", "proj_hidden_dim": 256, "proj_dim": 64},
            "optim": {"name": c["optimizer"]},
            "deepspeed": {
                "zero_stage": c["zero"],
                "precision": precision,
                "offload_optimizer": offload,
                "offload_param": offload if c["zero"] == 3 else "none",
                "reduce_bucket_size": reduce_bucket_size,
                "sub_group_size": sub_group_size,
                "max_live_parameters": max_live_parameters,
            },
            "train": {"num_workers": 2},
        },
        origin="bench memory",
    )


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _worker(rank: int, port: int, out_dir: str, job: dict) -> None:
    import resource

    import torch
    import torch.distributed as dist

    from raysl.train import host_memory
    from raysl.train.build import build
    from raysl.train.engine import DTYPES
    from raysl.train.local_world import join_local_world
    from raysl.train.trainer import train_step
    from raysl.train.zero_gather import local_numel

    torch.set_num_threads(job["threads"])
    cuda = torch.cuda.is_available()
    if host_memory.wanted(job["config"]["zero"], cuda):  # as a training worker does (raysl.train.trainer)
        host_memory.return_freed_memory()
    if cuda:
        torch.cuda.set_device(rank)
    join_local_world(rank, 2, port, "nccl" if cuda else "gloo")
    result: dict = {"rank": rank, "base_rss_mib": round(_rss_mib(), 1)}
    try:
        cfg = _config(
            job["backbone"],
            job["image_size"],
            job["batch_size"],
            job["config"],
            job["precision"],
            job["ckpt"],
            job["bucket"],
            job["sub_group"],
            job["max_live"],
        )
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")

        def built_method(method) -> None:  # what the build holds before the optimizer and the engine
            mine, whole = local_numel(method)
            result.update(params=whole, params_here=mine, built_rss_mib=round(_rss_mib(), 1))
            if cuda and cfg.deepspeed.zero_stage != 3:
                method.to(device)

        built = build(cfg, world_size=2, total_steps=job["steps"] + 1, on_method=built_method)
        method, schedules, optimizer, engine = built.method, built.schedules, built.optimizer, built.engine
        result["engine_rss_mib"] = round(_rss_mib(), 1)
        result["engine_peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        g = torch.Generator().manual_seed(rank)
        size, b = job["image_size"], job["batch_size"]
        views = [
            torch.randn(b, 3, size, size, generator=g).to(device, DTYPES[cfg.deepspeed.precision]) for _ in range(2)
        ]
        losses = []
        for s in range(job["steps"]):
            values = {**schedules.at(s), "step": s}
            out = train_step(engine, method, optimizer, [views], values)
            losses.append(float(out["loss"].detach().float()))
        result["losses"] = losses
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        if cuda:
            result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    except Exception as exc:  # reported in the JSON line, the next configuration still runs
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
        result["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    try:
        dist.destroy_process_group()
    except Exception:
        pass


def measure(job: dict) -> dict:
    """One configuration in 2 fresh worker processes; the per-worker results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as d:
        try:
            mp.spawn(_worker, args=(free_port(), d, job), nprocs=2)
        except Exception as exc:  # a worker killed (e.g. out of memory)
            return {"error": f"{type(exc).__name__}: {exc}"[:500], "workers": []}
        workers = []
        for r in range(2):
            with open(os.path.join(d, f"rank{r}.json")) as f:
                workers.append(json.load(f))
    return {"workers": workers}


def run_memory_bench(
    backbone: str,
    image_size: int,
    batch_size: int,
    configs: list[str],
    *,
    steps: int = 2,
    threads: int = 1,
    precision: str = "fp32",
    grad_checkpointing: bool = False,
    reduce_bucket_size: int = 0,
    sub_group_size: int = 0,
    max_live_parameters: int = 0,
    emit=print,
) -> list[dict]:
    rows = []
    for text in configs:
        c = parse_config(text)
        c["precision"] = c["precision"] or precision
        job = dict(
            backbone=backbone,
            image_size=image_size,
            batch_size=batch_size,
            config=c,
            steps=steps,
            threads=threads,
            precision=c["precision"],
            ckpt=grad_checkpointing,
            bucket=reduce_bucket_size,
            sub_group=sub_group_size,
            max_live=max_live_parameters,
        )
        got = measure(job)
        workers = got["workers"]
        key = "peak_cuda_mib" if any("peak_cuda_mib" in w for w in workers) else "peak_rss_mib"
        row = {
            "bench": "memory",
            "backbone": backbone,
            "image_size": image_size,
            "batch_size": batch_size,
            "precision": c["precision"],
            "reduce_bucket_size": reduce_bucket_size,
            "sub_group_size": sub_group_size,
            "max_live_parameters": max_live_parameters,
            "workers": 2,
            "zero_stage": c["zero"],
            "optimizer": c["optimizer"],
            "offload": c["offload"],
            "metric": key,
            "peak_mib": max((w.get(key, 0.0) for w in workers), default=None),
            "per_worker_mib": [w.get(key) for w in workers],
            "base_rss_mib": max((w.get("base_rss_mib", 0.0) for w in workers), default=None),
            # resident after the partitioned build, and the peak up to the engine (before any step)
            "built_rss_mib": max((w.get("built_rss_mib", 0.0) for w in workers), default=None),
            "engine_peak_rss_mib": max((w.get("engine_peak_rss_mib", 0.0) for w in workers), default=None),
            "params": workers[0].get("params") if workers else None,
            "params_per_worker": workers[0].get("params_here") if workers else None,
            "losses": workers[0].get("losses") if workers else None,
        }
        errors = [w["error"] for w in workers if "error" in w] + ([got["error"]] if "error" in got else [])
        if errors:
            row["error"] = errors[0]
        rows.append(row)
        emit(json.dumps(row))
    base = next(
        (r for r in rows if r["zero_stage"] == 0 and r["optimizer"] == "adamw" and r["offload"] == "none"), None
    )
    for r in rows:
        r["ratio_vs_zero0_adamw"] = r["ratio_above_base"] = None
        if base is None or not base.get("peak_mib") or not r.get("peak_mib") or "error" in r:
            continue
        r["ratio_vs_zero0_adamw"] = round(r["peak_mib"] / base["peak_mib"], 3)
        # The same ratio without the interpreter, torch, DeepSpeed and timm that every worker
        # holds before it builds a model (what the bytes-per-parameter arithmetic counts).
        if r.get("base_rss_mib") and base.get("base_rss_mib"):
            r["ratio_above_base"] = round(
                (r["peak_mib"] - r["base_rss_mib"]) / (base["peak_mib"] - base["base_rss_mib"]), 3
            )
    emit(table(rows))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| ZeRO | optimizer | offload | precision | peak per worker (MiB) | vs ZeRO-0 + AdamW "
        "| above the interpreter, vs ZeRO-0 + AdamW | params per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "-"
        ratio = (
            f"{r['ratio_vs_zero0_adamw']:.2f}x"
            if r.get("ratio_vs_zero0_adamw")
            else ("failed" if "error" in r else "-")
        )
        above = f"{r['ratio_above_base']:.2f}x" if r.get("ratio_above_base") else "-"
        params = f"{r['params_per_worker'] / 1e6:.1f} M" if r.get("params_per_worker") else "-"
        lines.append(
            f"| {r['zero_stage']} | {r['optimizer']} | {r['offload']} | {r['precision']} "
            f"| {peak} | {ratio} | {above} | {params} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="vit_large_patch16_224", help="timm backbone (random init)")
    p.add_argument("--image-size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--batch-size", type=int, default=2, help="images per worker and step (default 2)")
    p.add_argument("--steps", type=int, default=2, help="optimizer steps per configuration")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="deepspeed.precision (default fp32)")
    p.add_argument(
        "--grad-checkpointing", action="store_true", help="model.grad_checkpointing: recompute activations in backward"
    )
    p.add_argument(
        "--reduce-bucket-size",
        type=int,
        default=50_000_000,
        help="deepspeed.reduce_bucket_size (elements; 0: DeepSpeed's 5e8, up to 2 GB of fp32 bucket per worker)",
    )
    p.add_argument(
        "--sub-group-size",
        type=int,
        default=0,
        help="deepspeed.sub_group_size (ZeRO-3 optimizer step groups, elements; 0: DeepSpeed's 1e9)",
    )
    p.add_argument(
        "--max-live-parameters",
        type=int,
        default=0,
        help="deepspeed.max_live_parameters (ZeRO-3 gathered parameters kept alive; 0: DeepSpeed's 1e9)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=list(DEFAULT_CONFIGS),
        help="ZERO:OPTIMIZER[:OFFLOAD] each, e.g. 0:adamw 3:adamw8bit 3:adamw:cpu (first 0:adamw is the baseline)",
    )
    p.add_argument("--out", default="", help="also write the JSON lines to this file")


def run_from_args(a) -> list[dict]:
    lines: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        lines.append(text)

    rows = run_memory_bench(
        a.model,
        a.image_size,
        a.batch_size,
        a.configs,
        steps=a.steps,
        threads=a.threads,
        precision=a.precision,
        grad_checkpointing=a.grad_checkpointing,
        reduce_bucket_size=a.reduce_bucket_size,
        sub_group_size=a.sub_group_size,
        max_live_parameters=a.max_live_parameters,
        emit=emit,
    )
    if a.out:
        with open(a.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows
