"""`raysl bench methods`: does each SSL method learn? A short CPU pretraining run per
method on real images, then weighted kNN top-1 on a held-out real labeled set, against
the same backbone at random init (same seed, no training).

Data: scikit-learn's 1,797 real handwritten digits (8x8, 10 classes, bundled in the
wheel), upscaled to 32x32 PNGs. A seeded split keeps `test_fraction` of them out; the
rest is the pretraining pool (labels never read by training) and the kNN memory bank
(its labels are the kNN votes), the usual SSL protocol. Every run goes through the real
engine (`raysl.pretrain.pretrain`: Ray Train + DeepSpeed, one worker), its backbone is
read back from the final checkpoint, and features are extracted with
`raysl.eval.knn.extract_features` (eval-normalised, L2-normalised).
Results: a markdown table and a JSON file in the output folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import time

import numpy as np
import torch

# Every bench run: tiny timm ResNet at 32 px, batch 64, AdamW, one worker, fp32, ZeRO-0.
BASE = [
    "data.image_size=32",
    "data.batch_size=64",
    "data.shuffle_window=4",
    "model.backbone=test_resnet",
    "optim.name=adamw",
    "optim.lr=0.004",
    "optim.min_lr=0.00001",
    "optim.warmup_steps=10",
    "optim.weight_decay=0.0001",
    "deepspeed.zero_stage=0",
    "deepspeed.precision=fp32",
    "train.epochs=1000",
    "train.num_workers=1",
    "train.cpus_per_worker=1",
    "train.log_every=50",
    "train.checkpoint_every=100000",
    "train.keep_checkpoints=1",
]
# Small heads for every method that has these keys (a method's own overrides come after
# and win). Short-run settings per method live in its module (`bench_overrides`): crops
# gentle enough for 32 px digits (mocov2 preset: crop 0.2-1, DINO/SwAV global crops only,
# since local crops are 96 px), faster EMA.
SMALL_HEADS = ["method.proj_hidden_dim=256", "method.proj_dim=64", "method.pred_hidden_dim=256"]


def bench_methods() -> dict[str, list[str]]:
    """Every registered method's short-run overrides: SMALL_HEADS where it has the key,
    then its `Method.bench_overrides`."""
    from raysl.methods.base import discover

    out = {}
    for name, cls in discover().items():
        keys = {f"method.{f.name}" for f in dataclasses.fields(cls.config_class)}
        out[name] = [o for o in SMALL_HEADS if o.split("=")[0] in keys] + list(cls.bench_overrides)
    return out


# Options of a method, benchmarked under their own names (not in the default list).
VARIANTS = {
    "simclr-ft": ("simclr", ["method.ft_extrapolate=2.0", "method.ft_interpolate=1.6"]),
    "simclr-quality": ("simclr", ["method.quality_weighting=true"]),
    "mocov2-ft": ("mocov2", ["method.ft_extrapolate=2.0", "method.ft_interpolate=1.6"]),
}


def bench_overrides(name: str) -> tuple[str, list[str]]:
    """(method, overrides) of a bench entry: a method name or a VARIANTS name (the method's
    overrides plus the variant's)."""
    method, extra = VARIANTS.get(name, (name, []))
    return method, [*bench_methods()[method], *extra]


# --- data ----------------------------------------------------------------------------


def digits(size: int = 32) -> tuple[np.ndarray, np.ndarray, list[bytes]]:
    """(images uint8 (N, 3, size, size), labels (N,), PNG bytes of the size x size images)."""
    from PIL import Image

    from raysl.data.demo_images import digit_pngs

    pngs, labels = zip(*digit_pngs(size))
    imgs = [np.repeat(np.asarray(Image.open(io.BytesIO(png)), dtype=np.uint8)[None], 3, axis=0) for png in pngs]
    return np.stack(imgs), np.array(labels, dtype=np.int64), list(pngs)


def split(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    n_test = int(round(n * test_fraction))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


def write_shards(
    directory: str,
    pngs: list[bytes],
    labels: np.ndarray,
    idx: np.ndarray,
    shard_size: int = 100,
    key: str = "digits/{i:04d}.png",
) -> str:
    """The selected 32 x 32 digit PNGs as a shard set (schema + manifest of raysl.data.schema);
    `key` names row i."""
    from raysl.data.demo_images import DIGITS_LICENSE
    from raysl.data.schema import write_shard_set

    license_, attribution = DIGITS_LICENSE
    rows = [
        {
            "key": key.format(i=i),
            "image": pngs[i],
            "width": 32,
            "height": 32,
            "format": "png",
            "source": "sklearn:digits",
            "license": license_,
            "attribution": attribution,
            "label": int(labels[i]),
        }
        for i in idx
    ]
    write_shard_set(directory, rows, shard_size=shard_size, sources=["sklearn:digits"])
    return directory


def resize_uint8(images: np.ndarray, size: int) -> torch.Tensor:
    x = torch.from_numpy(images)
    if x.shape[-1] == size:
        return x
    y = torch.nn.functional.interpolate(x.float(), size=(size, size), mode="bicubic", align_corners=False)
    return y.round().clamp(0, 255).to(torch.uint8)


# --- backbones -----------------------------------------------------------------------


def trained_backbone(run_dir: str) -> torch.nn.Module:
    """The backbone of the run's last checkpoint (its weights.safetensors)."""
    from raysl.eval.weights import load_backbone

    return load_backbone(run_dir)[0]


def knn_eval(backbone, train_imgs, train_labels, test_imgs, test_labels, k: int = 20) -> dict:
    from raysl.eval.knn import extract_features, knn_top1

    train_f = extract_features(backbone, train_imgs, 256)
    test_f = extract_features(backbone, test_imgs, 256)
    top1, top5 = knn_top1(train_f, torch.from_numpy(train_labels), test_f, torch.from_numpy(test_labels), k=k)
    return {"top1": round(top1, 2), "top5": round(top5, 2)}


# --- the bench -----------------------------------------------------------------------


def run_methods_bench(
    methods: tuple[str, ...] | None = None,
    *,
    steps: int = 200,
    out_dir: str = "bench_methods",
    test_fraction: float = 1 / 3,
    seed: int = 0,
    extra_overrides: dict[str, list[str]] | None = None,
    address: str | None = None,
) -> dict:
    from raysl.config import load_config
    from raysl.errors import UserError
    from raysl.eval.weights import initial_backbone
    from raysl.pretrain import pretrain
    from raysl.train.metrics import read_metrics

    known = bench_methods()
    methods = tuple(known) if methods is None else methods
    unknown = [m for m in methods if m not in known and m not in VARIANTS]
    if unknown:
        raise UserError(
            f"bench methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join([*known, *VARIANTS])}"
        )
    if steps < 1:
        raise UserError(f"bench methods: --steps must be >= 1, got {steps}")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    out_dir = os.path.abspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    images, labels, pngs = digits(32)
    train_idx, test_idx = split(len(labels), test_fraction, seed)
    shards = write_shards(os.path.join(out_dir, "shards_pretrain"), pngs, labels, train_idx)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    storage = os.path.join(out_dir, "runs")

    rows, baselines = [], {}
    for name in methods:
        method, per_method = bench_overrides(name)
        overrides = [
            *BASE,
            *per_method,
            *(extra_overrides or {}).get(name, []),
            f"method.name={method}",
            f"data.shards={shards}",
            f"train.max_steps={steps}",
            f"train.seed={seed}",
            f"train.storage_path={storage}",
            f"train.name={name}-{stamp}",
        ]
        cfg = load_config("quickstart", overrides)
        size = cfg.data.image_size
        tr_imgs, te_imgs = resize_uint8(images[train_idx], size), resize_uint8(images[test_idx], size)
        key = (cfg.model.backbone, size)
        if key not in baselines:
            baselines[key] = knn_eval(initial_backbone(cfg), tr_imgs, labels[train_idx], te_imgs, labels[test_idx])
        t0 = time.perf_counter()
        summary = pretrain(cfg, address=address)
        wall = time.perf_counter() - t0
        trained = knn_eval(trained_backbone(summary["run_dir"]), tr_imgs, labels[train_idx], te_imgs, labels[test_idx])
        metrics = read_metrics(summary["run_dir"])
        last = metrics[-1] if metrics else {}
        rows.append(
            {
                "method": name,
                "backbone": cfg.model.backbone,
                "image_size": size,
                "steps": summary["steps"],
                "wall_s": round(wall, 1),
                "knn_top1_random": baselines[key]["top1"],
                "knn_top1": trained["top1"],
                "delta": round(trained["top1"] - baselines[key]["top1"], 2),
                "knn_top5": trained["top5"],
                "first_loss": round(metrics[0]["loss"], 4) if metrics else None,
                "final_loss": round(last.get("loss", float("nan")), 4),
                "embedding_std": round(last.get("embedding_std", float("nan")), 4),
                "run_dir": summary["run_dir"],
                "overrides": overrides,
            }
        )
        print(format_table(rows[-1:], header=not rows[:-1]), flush=True)
    result = {
        "bench": "methods",
        "data": f"sklearn digits: {len(train_idx)} pretrain/kNN-train, {len(test_idx)} held-out test, "
        "32x32, 10 classes",
        "knn": "weighted cosine kNN, k=20, T=0.07 (DINO)",
        "steps": steps,
        "batch_size": 64,
        "rows": rows,
    }
    with open(os.path.join(out_dir, "bench_methods.json"), "w") as f:
        json.dump(result, f, indent=2)
    table = format_table(rows)
    with open(os.path.join(out_dir, "bench_methods.md"), "w") as f:
        f.write(table + "\n")
    result["table"] = table
    return result


def format_table(rows: list[dict], header: bool = True) -> str:
    lines = []
    if header:
        lines += [
            "| method | backbone | steps | wall (s) | kNN top-1 random init | kNN top-1 pretrained | delta "
            "| loss first -> last |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['backbone']} @{r['image_size']}px | {r['steps']} | {r['wall_s']} | "
            f"{r['knn_top1_random']:.1f} | {r['knn_top1']:.1f} | {r['delta']:+.1f} | "
            f"{r['first_loss']} -> {r['final_loss']} |"
        )
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument(
        "--methods",
        default="",
        help=f"comma-separated methods (default: all); variants: {', '.join(VARIANTS)}",
    )
    p.add_argument("--steps", type=int, default=200, help="pretraining steps per method (batch 64)")
    p.add_argument(
        "--out", type=resolve_path, default="bench_methods", help="folder for shards, runs, bench_methods.md/.json"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the digits split and of every run (default 0)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="METHOD:section.key=value",
        help="extra override for one bench entry, e.g. dino:optim.lr=0.01 (repeatable)",
    )


def run_from_args(args, address: str | None = None) -> dict:
    from raysl.errors import UserError

    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip()) or None  # none named: all
    extra: dict[str, list[str]] = {}
    for item in args.set:
        if ":" not in item:
            raise UserError(f"--set {item!r}: expected METHOD:section.key=value")
        name, override = item.split(":", 1)
        extra.setdefault(name, []).append(override)
    return run_methods_bench(
        methods, steps=args.steps, out_dir=args.out, seed=args.seed, extra_overrides=extra, address=address
    )
