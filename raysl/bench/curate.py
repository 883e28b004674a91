"""`raysl bench curate`: does curation do what it says, on real images, and what does it cost.

- dedup: bundled photographs plus planted near-duplicates of each (JPEG quality 10, half size,
  90% centre crop, slight colour shift; curate.planted), embedded by `raysl curate embed`
  (Ray Data actors) and deduplicated at the default threshold: recall (planted copies
  dropped / planted copies) and precision (planted copies among the dropped). A group's
  copies count as found when every image but one of the group is dropped as a duplicate
  of another image of the same group.
- balance: scikit-learn digits with one class at 50%; the entropy of the class distribution
  as a fraction of its maximum, for the whole set, a random sample and the balanced sample
  of the same size.
- scale: `curate dedup` as tasks over parts on N synthetic embeddings with planted copies,
  per N: seconds per step, the largest task's and the driver's peak memory, recall and
  precision (see bench.curate_scale).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from raysl.curate.dedup import DEFAULT_MARGIN, DEFAULT_THRESHOLD


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="", help="working folder (default: a temporary one)")
    p.add_argument(
        "--parts", default="dedup,balance,scale", help="comma list of dedup, balance, scale, pretrain (not default)"
    )
    p.add_argument("--model", default="resnet18", help="timm name (random init) or a raysl run directory")
    p.add_argument("--image-size", type=int, default=112, help="eval crop size for the photographs (default 112)")
    p.add_argument("--stage", type=int, default=0, help="feature stage for dedup (-1: pooled output)")
    p.add_argument(
        "--input-norm", default="per-image", help="imagenet or per-image, as curate embed (default per-image)"
    )
    p.add_argument(
        "--threshold", type=float, default=DEFAULT_THRESHOLD, help=f"dedup cosine (default {DEFAULT_THRESHOLD})"
    )
    p.add_argument("--digits", type=int, default=340, help="long-tailed digits set size (class 0: half)")
    p.add_argument("--digits-size", type=int, default=64, help="eval crop size for the digits (pooled features)")
    p.add_argument("--target", type=int, default=100, help="balanced sample size")
    p.add_argument("--levels", default="30,10", help="balance: clusters per level, bottom first (default 30,10)")
    p.add_argument(
        "--balance-seeds", type=int, default=5, help="balance: seeds (k-means and draw) the fractions are averaged over"
    )
    p.add_argument("--pretrain-target", type=int, default=96, help="pretrain part: sample size")
    p.add_argument("--pretrain-steps", type=int, default=150, help="pretrain part: SimCLR steps per run")
    p.add_argument("--scale", default="100000", help="scale part: comma list of N, embeddings (default 100000)")
    p.add_argument("--scale-dim", type=int, default=128, help="scale part: embedding dimension (default 128)")
    p.add_argument("--scale-part-rows", type=int, default=65536, help="scale part: rows per embedding part")
    p.add_argument("--scale-sample", type=int, default=256_000, help="scale part: k-means sample (default 256,000)")
    p.add_argument("--scale-iters", type=int, default=10, help="scale part: k-means iterations (default 10)")
    p.add_argument("--scale-clusters", type=int, default=0, help="scale part: default N / 1000, as curate dedup")
    p.add_argument("--scale-threshold", type=float, default=0.95, help="scale part: dedup cosine (default 0.95)")
    p.add_argument(
        "--scale-margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"scale part: dedup --margin (default {DEFAULT_MARGIN})",
    )
    p.add_argument(
        "--scale-coarse", type=int, default=0, help="scale part: coarse k-means cells (default ~sqrt(clusters))"
    )
    p.add_argument(
        "--scale-single", action="store_true", help="scale part: also the in-memory SemDeDup on the same embeddings"
    )
    p.add_argument("--scale-keep", action="store_true", help="scale part: keep the embeddings and selections")


def _write(directory: str, rows: list[dict], shard_size: int) -> str:
    from raysl.data.schema import write_shard_set

    base = dict(width=1, height=1, format="png", source="bench", license="cc0-1.0", attribution="", label=None)
    write_shard_set(directory, [base | r for r in rows], shard_size=shard_size, sources=["bench"])
    return directory


def _embed(shards: str, out: str, args, image_size: int, **features) -> str:
    from raysl.curate.embed import plan_embed, run_embed

    run_embed(plan_embed(shards, args.model, out, image_size=image_size, **features))
    return out


def dedup_scores(lineage, groups: dict[str, str]) -> dict:
    """Recall and precision of the dropped duplicates against the planted groups."""
    keys = lineage.column("key").to_pylist()
    dropped = [
        k
        for k, d, r in zip(keys, lineage.column("decision").to_pylist(), lineage.column("reason").to_pylist())
        if d == "drop" and r == "duplicate"
    ]
    of = dict(zip(keys, lineage.column("duplicate_of").to_pylist()))
    planted = len(keys) - len(set(groups.values()))
    correct = sum(groups[k] == groups[of[k]] for k in dropped)
    return {
        "images": len(keys),
        "planted_copies": planted,
        "dropped": len(dropped),
        "dropped_correctly": correct,
        "recall": round(correct / planted, 4),
        "precision": round(correct / max(len(dropped), 1), 4),
    }


def bench_dedup(work: str, args) -> dict:
    import pyarrow.parquet as pq

    from raysl.curate.planted import planted_duplicates
    from raysl.curate.steps import run_dedup

    rows = planted_duplicates()
    shards = _write(os.path.join(work, "photos"), [{"key": r["key"], "image": r["image"]} for r in rows], 25)
    t = time.perf_counter()
    features = dict(stage=args.stage, input_norm=args.input_norm)
    emb = _embed(shards, os.path.join(work, "photos_emb"), args, args.image_size, **features)
    embed_s = time.perf_counter() - t
    out = os.path.join(work, "photos_dedup")
    curation = run_dedup(emb, out, threshold=args.threshold, overwrite=True)
    scores = dedup_scores(pq.read_table(os.path.join(out, "lineage.parquet")), {r["key"]: r["group"] for r in rows})
    return scores | {"threshold": args.threshold, "model": curation["model"], "embed_s": round(embed_s, 1)}


def bench_balance(work: str, args) -> dict:
    """Entropy fractions, each the mean over `--balance-seeds` seeds (k-means and draw): the
    balanced sample as tasks over parts, the in-memory balanced sample (the same tree and
    shares; the draw within a cluster differs), and a random sample of the same size."""
    import pyarrow.parquet as pq

    from raysl.curate import balance, embeddings
    from raysl.curate.planted import entropy_fraction, long_tailed_digits
    from raysl.curate.steps import parse_levels, run_balance
    from raysl.data.demo_images import digit_pngs

    idx, labels = long_tailed_digits(args.digits)
    pngs = digit_pngs(32)
    rows = [{"key": f"digits/{i:04d}.png", "image": pngs[i][0], "label": int(labels[i])} for i in idx]
    shards = _write(os.path.join(work, "digits"), rows, 100)
    emb = _embed(shards, os.path.join(work, "digits_emb"), args, args.digits_size)
    label_of = {r["key"]: r["label"] for r in rows}
    _, table, x = embeddings.load(emb)
    emb_labels = np.array([label_of[k] for k in table.column("key").to_pylist()])
    levels = parse_levels(args.levels)
    drawn: dict[str, list[np.ndarray]] = {"random": [], "balanced": [], "in_memory": []}
    for seed in range(args.balance_seeds):
        out = os.path.join(work, f"digits_balanced_{seed}")
        run_balance(emb, out, target=args.target, levels=levels, seed=seed, overwrite=True)
        lineage = pq.read_table(os.path.join(out, "lineage.parquet"))
        drawn["balanced"].append(emb_labels[np.array(lineage.column("decision").to_pylist()) == "keep"])
        ids = balance.hierarchical_kmeans(x, levels, seed=seed)
        drawn["in_memory"].append(emb_labels[balance.balanced_sample(ids, args.target, seed=seed)])
        drawn["random"].append(np.random.default_rng(seed).choice(labels[idx], args.target, replace=False))

    def mean(f) -> dict:
        return {k: round(float(np.mean([f(v) for v in draws])), 4) for k, draws in drawn.items()}

    return {
        "images": len(rows),
        "target": args.target,
        "levels": args.levels,
        "seeds": args.balance_seeds,
        "head_class_share": {"all": 0.5} | mean(lambda v: np.mean(v == 0)),
        "entropy_fraction": {"all": round(entropy_fraction(labels[idx]), 4)} | mean(entropy_fraction),
        "entropy_fraction_per_seed": {k: [round(entropy_fraction(v), 4) for v in d] for k, d in drawn.items()},
    }


def bench_pretrain(work: str, args) -> dict:
    """SimCLR (raysl bench methods' short-run settings) on a balanced sample against a random
    sample of the same size from a long-tailed digit pool (class 0: half), same steps;
    kNN top-1 of both on the held-out digits (memory bank: the whole training split)."""
    import pyarrow.parquet as pq

    from raysl.bench.methods import BASE, bench_overrides, digits, knn_eval, resize_uint8, split, trained_backbone
    from raysl.bench.methods import write_shards as write_digits
    from raysl.config import load_config
    from raysl.curate.planted import entropy_fraction
    from raysl.curate.selection import LINEAGE
    from raysl.curate.steps import parse_levels, run_balance
    from raysl.pretrain import pretrain

    images, labels, pngs = digits(32)
    train_idx, test_idx = split(len(labels), 1 / 3, 0)
    rng = np.random.default_rng(0)
    head = train_idx[labels[train_idx] == 0]
    tail = [rng.choice(train_idx[labels[train_idx] == c], len(head) // 9, replace=False) for c in range(1, 10)]
    pool = np.sort(np.concatenate([head, *tail]))
    shards = write_digits(os.path.join(work, "pool"), pngs, labels, pool, shard_size=40)
    emb = _embed(shards, os.path.join(work, "pool_emb"), args, args.digits_size)
    balanced = os.path.join(work, "pool_balanced")
    run_balance(emb, balanced, target=args.pretrain_target, levels=parse_levels(args.levels), overwrite=True)
    lineage = pq.read_table(os.path.join(balanced, LINEAGE))
    kept = [
        int(k.split("/")[1][:4])
        for k, d in zip(lineage["key"].to_pylist(), lineage["decision"].to_pylist())
        if d == "keep"
    ]
    rand_idx = np.sort(rng.choice(pool, args.pretrain_target, replace=False))
    random_dir = write_digits(os.path.join(work, "pool_random"), pngs, labels, rand_idx, shard_size=40)
    method, per_method = bench_overrides("simclr")
    tr, te = resize_uint8(images[train_idx], 32), resize_uint8(images[test_idx], 32)
    out = {"pool": len(pool), "sample": args.pretrain_target, "steps": args.pretrain_steps, "method": method}
    for name, data, idx in (("balanced", balanced, kept), ("random", random_dir, rand_idx)):
        overrides = [*BASE, *per_method, f"method.name={method}", f"data.shards={data}", "data.batch_size=32"]
        overrides += [f"train.max_steps={args.pretrain_steps}", f"train.storage_path={os.path.join(work, 'runs')}"]
        cfg = load_config("quickstart", [*overrides, f"train.name=curate-{name}-{time.strftime('%H%M%S')}"])
        run = pretrain(cfg)["run_dir"]
        knn = knn_eval(trained_backbone(run), tr, labels[train_idx], te, labels[test_idx])
        out[name] = {"entropy_fraction": round(entropy_fraction(labels[np.asarray(idx)]), 4), "knn_top1": knn["top1"]}
    return out


def run_from_args(args) -> dict:
    from raysl.bench.curate_scale import bench_scale
    from raysl.runtime import init_ray

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    result: dict = {}
    work = args.out or tempfile.mkdtemp(prefix="raysl_bench_curate_")
    if "scale" in parts:  # one JSON line per N as it is measured, then all of them in the result
        result["scale"] = bench_scale(work, args)
    if {"dedup", "balance", "pretrain"} & set(parts):
        init_ray(getattr(args, "address", None))
    if "dedup" in parts:
        result["dedup"] = bench_dedup(work, args)
    if "balance" in parts:
        result["balance"] = bench_balance(work, args)
    if "pretrain" in parts:
        result["pretrain"] = bench_pretrain(work, args)
    return result
