"""The curate subcommands after `embed`: each checks its inputs (only small files: embed.json,
parquet footers, an earlier lineage) before any work, applies one step to the candidates
and writes a selection (see selection)."""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from raysl.curate import balance, decontaminate, dedup, embeddings
from raysl.curate.selection import State, candidates_count, plan_out
from raysl.errors import UserError

CLUSTER_SIZE = 1000  # dedup's default: images per k-means cluster


def _check_common(emb: str, model: str | None, sel: str | None, out: str, overwrite: bool) -> int:
    if not os.path.isdir(emb):
        raise UserError(f"--emb {emb}: no such folder (make it with raysl curate embed)")
    embeddings.check_model(emb, embeddings.read_meta(emb), model)
    plan_out(out, overwrite)
    return candidates_count(emb, sel)


def run_dedup(
    emb: str,
    out: str,
    *,
    model: str | None = None,
    sel: str | None = None,
    clusters: int = 0,
    threshold: float = dedup.DEFAULT_THRESHOLD,
    keep: str = "closest",
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: a cosine similarity in (0, 1]")
    if keep not in dedup.KEEP:
        raise UserError(f"--keep {keep}: one of {', '.join(dedup.KEEP)}")
    n = _check_common(emb, model, sel, out, overwrite)
    # ~1,000 images per cluster (SemDeDup: 50k clusters for 440 M): a group of copies split over two
    # clusters is missed, and small sets stay in one cluster, where the search is exact
    clusters = clusters or max(1, n // CLUSTER_SIZE)
    state = State(emb, model, sel)
    rows = state.candidates
    found = dedup.semdedup(state.x[rows], clusters=clusters, threshold=threshold, keep=keep, seed=seed)
    hit = found["duplicate_of"] >= 0
    state.dedup_cluster[rows] = found["cluster"]
    state.duplicate_of[rows[hit]] = [state.keys[i] for i in rows[found["duplicate_of"][hit]]]
    state.similarity[rows[hit]] = found["similarity"][hit]
    state.drop(rows[hit], "duplicate")
    step = {"step": "dedup", "clusters": clusters, "threshold": threshold, "keep": keep, "dropped": int(hit.sum())}
    return state.write(out, step)


def run_decontaminate(
    emb: str,
    evals: list[str],
    out: str,
    *,
    model: str | None = None,
    sel: str | None = None,
    threshold: float = decontaminate.DEFAULT_THRESHOLD,
    overwrite: bool = False,
) -> dict:
    if not evals:
        raise UserError("--eval: give at least one embedding set of an evaluation shard set")
    train_model = embeddings.read_meta(emb)["model"] if os.path.isdir(emb) else None
    for e in evals:
        if not os.path.isdir(e):
            raise UserError(f"--eval {e}: no such folder (embed the eval shard set with raysl curate embed first)")
        if not os.path.exists(os.path.join(e, embeddings.META)):
            raise UserError(
                f"--eval {e}: not an embedding set (no {embeddings.META}); run raysl curate embed --shards {e} "
                f"--model <the model of --emb> --out EVAL_EMB and pass EVAL_EMB"
            )
        embeddings.check_model(e, embeddings.read_meta(e), train_model, flag="the model of --emb")
    _check_common(emb, model, sel, out, overwrite)
    state = State(emb, model, sel)
    rows = state.candidates
    eval_x = np.concatenate([embeddings.load(e, train_model)[2] for e in evals])
    sims, _ = decontaminate.nearest(state.x[rows], eval_x)
    hit = sims > threshold
    state.similarity[rows[hit]] = sims[hit]
    state.drop(rows[hit], "contaminated")
    step = {"step": "decontaminate", "eval": [os.path.abspath(e) for e in evals], "threshold": threshold}
    return state.write(out, step | {"dropped": int(hit.sum())})


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--levels {text!r}: clusters per level, bottom first, e.g. 100,10") from None
    if not levels or min(levels) < 1:
        raise UserError(f"--levels {text!r}: clusters per level, bottom first, each >= 1, e.g. 100,10")
    return levels


def run_balance(
    emb: str,
    out: str,
    *,
    target: int,
    levels: list[int],
    model: str | None = None,
    sel: str | None = None,
    resample: int = 0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict:
    n = _check_common(emb, model, sel, out, overwrite)
    if target < 1 or target > n:
        raise UserError(f"--target {target}: the set has {n} candidate image(s); ask for 1..{n}")
    state = State(emb, model, sel)
    rows = state.candidates
    ids = balance.hierarchical_kmeans(state.x[rows], levels, resample=resample, seed=seed)
    picked = balance.balanced_sample(ids, target, seed=seed)
    for r, c in zip(rows, ids.tolist()):
        state.clusters[r] = c
    dropped = np.setdiff1d(np.arange(len(rows)), picked)
    state.drop(rows[dropped], "balance")
    step = {"step": "balance", "target": target, "levels": levels, "resample": resample, "dropped": len(dropped)}
    return state.write(out, step)


def _add_common_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("--emb", type=resolve_path, required=True, help="embeddings of the set (raysl curate embed)")
    p.add_argument("--out", type=resolve_path, required=True, help="folder for the selection (a shard set)")
    p.add_argument("--from", dest="sel", type=resolve_path, help="start from an earlier selection of the same EMB")
    p.add_argument("--model", help="refuse EMB unless it was embedded with this model (run dir or timm name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the k-means and of the balanced sample (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a selection already in --out")


def add_dedup_arguments(p: argparse.ArgumentParser) -> None:
    _add_common_arguments(p)
    threshold = dedup.DEFAULT_THRESHOLD
    p.add_argument("--threshold", type=float, default=threshold, help=f"cosine (default {threshold})")
    p.add_argument("--clusters", type=int, default=0, help="k-means clusters (default N / 1000)")
    p.add_argument("--keep", choices=dedup.KEEP, default="closest", help="which image of a group stays")


def add_decontaminate_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    _add_common_arguments(p)
    p.add_argument("--eval", nargs="+", type=resolve_path, required=True, help="embedding sets of eval shard sets")
    p.add_argument(
        "--threshold",
        type=float,
        default=dedup.DEFAULT_THRESHOLD,
        help=f"drop an image whose nearest eval image is above this cosine (default {dedup.DEFAULT_THRESHOLD})",
    )


def add_balance_arguments(p: argparse.ArgumentParser) -> None:
    _add_common_arguments(p)
    p.add_argument("--target", type=int, required=True, help="images to keep")
    p.add_argument("--levels", default="100,10", help="clusters per level, bottom first (default 100,10)")
    p.add_argument("--resample", type=int, default=0, help="resampling steps per level (Vo et al. 2024)")


def run_from_args(args: argparse.Namespace) -> None:
    common = dict(model=args.model, sel=args.sel, overwrite=args.overwrite)
    if args.curate_cmd == "dedup":
        kw = dict(clusters=args.clusters, keep=args.keep, seed=args.seed)
        curation = run_dedup(args.emb, args.out, threshold=args.threshold, **kw, **common)
    elif args.curate_cmd == "decontaminate":
        curation = run_decontaminate(args.emb, args.eval, args.out, threshold=args.threshold, **common)
    else:
        kw = dict(target=args.target, levels=parse_levels(args.levels), resample=args.resample, seed=args.seed)
        curation = run_balance(args.emb, args.out, **kw, **common)
    print(json.dumps({"out": args.out, **curation["counts"], "step": curation["steps"][-1]}))
