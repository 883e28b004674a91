"""The curate subcommands after `embed`: each checks its inputs (only small files: embed.json,
parquet footers, an earlier selection's manifest) before any work, then runs its step as
tasks over the embedding parts (see parts: atomic part files, a rerun resumes) and writes a
selection (see selection).

dedup: a sample -> k-means (this process) -> one assignment task per part, writing its
candidates grouped by cluster group -> one SemDeDup task per group of clusters -> one
lineage task per part. decontaminate: one task per part against the eval embeddings.
balance: a sample -> the k-means tree (this process) -> one assignment task per part ->
the top-down split on cluster counts (this process) -> one sampling task per part.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from raysl.curate import balance, decontaminate, dedup, embeddings, parts, selection
from raysl.curate.assign import centroid_index, draw_sample, nearest_two, pack_groups
from raysl.curate.kmeans import fit
from raysl.curate.selection import LINEAGE, candidates_count, plan_out
from raysl.errors import UserError

CLUSTER_SIZE = 1000  # dedup's default: images per k-means cluster
SAMPLE_PER_CLUSTER = 100  # default k-means sample: images per cluster,
SAMPLE_MAX = 1_000_000  # up to this many (the sample is what one process holds)
GROUP_IMAGES = 100_000  # dedup: about this many images per task (small clusters are grouped)


def _check_common(emb: str, model: str | None, sel: str | None, out: str, overwrite: bool) -> int:
    if not parts.exists(emb):
        raise UserError(f"--emb {emb}: no such folder (make it with raysl curate embed)")
    meta = embeddings.read_meta(emb)
    embeddings.check_model(emb, meta, model)
    embeddings.part_uris(emb, meta)
    plan_out(out, overwrite)
    n = candidates_count(emb, sel)
    if n == 0:
        raise UserError(
            f"--from {sel}: keeps no image, so there is nothing to curate" if sel else f"{emb}: holds no embeddings"
        )
    return n


def _open_work(out: str, settings: dict, overwrite: bool) -> str:
    """The step's working folder; a selection being replaced (--overwrite) is removed first,
    so a crash leaves no stale selection, and a rerun with the same arguments resumes."""
    from raysl.data.schema import MANIFEST

    restart = overwrite and parts.exists(parts.join(out, MANIFEST))
    return parts.open_work(out, settings, restart, [MANIFEST, LINEAGE])


class _Phases:
    """Seconds, parts and the largest task's peak memory of each phase of a step (what
    `raysl bench curate --scale` reports)."""

    def __init__(self):
        self.phases: dict[str, dict] = {}
        self.start = time.perf_counter()

    def add(self, name: str, summaries: list[dict] | None = None) -> None:
        now = time.perf_counter()
        row: dict = {"seconds": round(now - self.start, 2)}
        if summaries is not None:
            row["tasks"] = len(summaries)
            row["reused"] = sum(bool(s.get("reused")) for s in summaries)
            row["peak_task_bytes"] = max((s.get("peak_rss", 0) for s in summaries if not s.get("reused")), default=0)
        self.phases[name] = row
        self.start = now


def _write_selection(out, emb, meta, curation, step: dict, summaries, phases: _Phases, reason: str) -> dict:
    """Write the step's selection: `step` records how many images this step dropped for
    `reason` (all parts' drops for it, less those of the selection it started from)."""
    dropped = sum(s["dropped"][reason] for s in summaries) - curation.get("counts", {}).get(f"dropped_{reason}", 0)
    record = selection.write(out, emb, meta, curation, step | {"dropped": dropped}, summaries)
    phases.add("write")
    return record | {"phases": phases.phases}


def _sample_size(sample: int, clusters: int, n: int) -> int:
    if sample < 0:
        raise UserError(f"--sample {sample}: images k-means trains on, >= 1 (0: the default)")
    return sample or min(SAMPLE_PER_CLUSTER * clusters, SAMPLE_MAX)


def check_dedup(
    emb,
    out,
    *,
    model=None,
    sel=None,
    threshold=dedup.DEFAULT_THRESHOLD,
    keep="closest",
    margin=dedup.DEFAULT_MARGIN,
    overwrite=False,
):
    """Candidates of a dedup with these arguments; a UserError for bad input."""
    if not 0 < threshold <= 1:
        raise UserError(f"--threshold {threshold}: a cosine similarity in (0, 1]")
    if not 0 <= margin < 2:
        raise UserError(f"--margin {margin}: a cosine difference in [0, 2) (0: each image in its nearest cluster only)")
    if keep not in dedup.KEEP:
        raise UserError(f"--keep {keep}: one of {', '.join(dedup.KEEP)}")
    return _check_common(emb, model, sel, out, overwrite)


def run_dedup(
    emb: str,
    out: str,
    *,
    model: str | None = None,
    sel: str | None = None,
    clusters: int = 0,
    sample: int = 0,
    threshold: float = dedup.DEFAULT_THRESHOLD,
    keep: str = "closest",
    seed: int = 0,
    iters: int = 20,
    margin: float = dedup.DEFAULT_MARGIN,
    coarse: int = 0,
    group_images: int = GROUP_IMAGES,
    overwrite: bool = False,
) -> dict:
    n = check_dedup(emb, out, model=model, sel=sel, threshold=threshold, keep=keep, margin=margin, overwrite=overwrite)
    # ~1,000 images per cluster (SemDeDup: 50k clusters for 440 M): a group of copies split over two
    # clusters is missed unless within the margin, and small sets stay in one cluster, where the search is exact
    clusters = clusters or max(1, n // CLUSTER_SIZE)
    sample = _sample_size(sample, clusters, n)
    meta, curation = embeddings.read_meta(emb), selection.prior(sel, emb)
    uris, model_id = embeddings.part_uris(emb, meta), meta["model"]
    settings = dict(step="dedup", emb=emb, sel=sel, clusters=clusters, sample=sample, threshold=threshold)
    settings |= dict(margin=margin, coarse=coarse, keep=keep, seed=seed, iters=iters, group_images=group_images)
    work = _open_work(out, settings, overwrite)
    phases = _Phases()
    centroids_uri = parts.join(work, "centroids.parquet")
    if not parts.exists(centroids_uri):
        x = draw_sample(uris, model_id, sel, sample, n, seed)
        phases.add("sample")
        centroids, top = fit(x, clusters, coarse=coarse, iters=iters, seed=seed)
        ids, sims = nearest_two(centroid_index(centroids, top), x)
        # images per cluster, memberships in a second cluster included (what a dedup task holds)
        sizes = np.bincount(dedup.memberships(ids, sims, margin)[1], minlength=len(centroids)) * (n / max(len(x), 1))
        group_of = pack_groups(sizes, group_images)
        summary = {"groups": group_of.tolist(), "sample": len(x), "clusters": len(centroids)}
        parts.write_array(centroids_uri, np.concatenate([centroids, top]), summary)
        phases.add("kmeans")
    else:
        print(f"curate dedup: k-means of an earlier run reused ({centroids_uri})", file=sys.stderr)
    fitted, fitted_summary = parts.read_array(centroids_uri), parts.summary(centroids_uri)
    group_of, k = np.array(fitted_summary["groups"]), fitted_summary["clusters"]
    centroids, top = fitted[:k], fitted[k:]
    shared_centroids, shared_top = parts.share(centroids), parts.share(top)
    priors = [selection.prior_part(sel, s) for s in range(len(uris))]
    assigned = [parts.join(work, "assign", parts.part_name(s)) for s in range(len(uris))]
    calls: list[tuple] = [
        (u, model_id, priors[s], s, shared_centroids, shared_top, group_of, margin) for s, u in enumerate(uris)
    ]
    phases.add("assign", parts.run_parts(dedup.assign_part, calls, assigned, "curate dedup: assign"))
    groups = int(group_of.max()) + 1
    drops = [parts.join(work, "dedup", f"group-{g:05d}.arrow") for g in range(groups)]
    calls = [(assigned, g, shared_centroids, threshold, keep) for g in range(groups)]
    phases.add("dedup", parts.run_parts(dedup.dedup_group, calls, drops, "curate dedup: dedup"))
    lineage = [parts.join(out, LINEAGE, parts.part_name(s)) for s in range(len(uris))]
    calls = [(u, model_id, priors[s], s, assigned[s], drops) for s, u in enumerate(uris)]
    summaries = parts.run_parts(dedup.lineage_part, calls, lineage, "curate dedup: lineage")
    phases.add("lineage", summaries)
    step = {"step": "dedup", "clusters": clusters, "sample": sample, "threshold": threshold, "keep": keep}
    step |= {"margin": margin, "coarse": len(top) or 1}
    return _write_selection(out, emb, meta, curation, step, summaries, phases, "duplicate")


def check_decontaminate(emb, evals, out, *, model=None, sel=None, overwrite=False) -> int:
    """Candidates of a decontamination with these arguments; a UserError for bad input."""
    if not evals:
        raise UserError("--eval: give at least one embedding set of an evaluation shard set")
    train_model = embeddings.read_meta(emb)["model"] if parts.exists(emb) else None
    for e in evals:
        if not parts.exists(e):
            raise UserError(f"--eval {e}: no such folder (embed the eval shard set with raysl curate embed first)")
        if not parts.exists(parts.join(e, embeddings.META)):
            raise UserError(
                f"--eval {e}: not an embedding set (no {embeddings.META}); run raysl curate embed --shards {e} "
                f"--model <the model of --emb> --out EVAL_EMB and pass EVAL_EMB"
            )
        embeddings.check_model(e, embeddings.read_meta(e), train_model, flag="the model of --emb")
    return _check_common(emb, model, sel, out, overwrite)


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
    check_decontaminate(emb, evals, out, model=model, sel=sel, overwrite=overwrite)
    meta, curation = embeddings.read_meta(emb), selection.prior(sel, emb)
    uris, model_id = embeddings.part_uris(emb, meta), meta["model"]
    settings = dict(step="decontaminate", emb=emb, sel=sel, eval=evals, threshold=threshold)
    _open_work(out, settings, overwrite)
    phases = _Phases()
    # the evaluation index: every eval embedding, shared by the tasks (eval sets are small)
    eval_x = parts.share(np.concatenate([_load_all(e, model_id) for e in evals]))
    lineage = [parts.join(out, LINEAGE, parts.part_name(s)) for s in range(len(uris))]
    calls = [(u, model_id, selection.prior_part(sel, s), s, eval_x, threshold) for s, u in enumerate(uris)]
    summaries = parts.run_parts(decontaminate.decontaminate_part, calls, lineage, "curate decontaminate")
    phases.add("decontaminate", summaries)
    step = {"step": "decontaminate", "eval": [selection._absolute(e) for e in evals], "threshold": threshold}
    return _write_selection(out, emb, meta, curation, step, summaries, phases, "contaminated")


def _load_all(emb: str, model: str) -> np.ndarray:
    meta = embeddings.read_meta(emb)
    cols = [
        embeddings.read_part(u, meta["model"], ["embedding"]).column("embedding")
        for u in embeddings.part_uris(emb, meta)
    ]
    return np.concatenate([embeddings.vectors(c) for c in cols]) if cols else np.zeros((0, 1), np.float32)


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--levels {text!r}: clusters per level, bottom first, e.g. 100,10") from None
    if not levels or min(levels) < 1:
        raise UserError(f"--levels {text!r}: clusters per level, bottom first, each >= 1, e.g. 100,10")
    return levels


def check_balance(emb, out, *, target, model=None, sel=None, overwrite=False) -> int:
    """Candidates of a balance with these arguments; a UserError for bad input."""
    n = _check_common(emb, model, sel, out, overwrite)
    if target < 1 or target > n:
        raise UserError(f"--target {target}: the set has {n} candidate image(s); ask for 1..{n}")
    return n


def run_balance(
    emb: str,
    out: str,
    *,
    target: int,
    levels: list[int],
    model: str | None = None,
    sel: str | None = None,
    sample: int = 0,
    resample: int = 0,
    seed: int = 0,
    iters: int = 20,
    overwrite: bool = False,
) -> dict:
    n = check_balance(emb, out, target=target, model=model, sel=sel, overwrite=overwrite)
    sample = _sample_size(sample, levels[0], n)
    meta, curation = embeddings.read_meta(emb), selection.prior(sel, emb)
    uris, model_id = embeddings.part_uris(emb, meta), meta["model"]
    settings = dict(step="balance", emb=emb, sel=sel, target=target, levels=levels, sample=sample)
    work = _open_work(out, settings | dict(resample=resample, seed=seed, iters=iters), overwrite)
    phases = _Phases()
    tree_uri = parts.join(work, "centroids.parquet")
    if not parts.exists(tree_uri):
        x = draw_sample(uris, model_id, sel, sample, n, seed)
        phases.add("sample")
        first, parents = balance.fit_tree(x, levels, resample=resample, seed=seed, iters=iters)
        parts.write_array(tree_uri, first, {"parents": [p.tolist() for p in parents], "sample": len(x)})
        phases.add("kmeans")
    else:
        print(f"curate balance: k-means of an earlier run reused ({tree_uri})", file=sys.stderr)
    first, parents = parts.read_array(tree_uri), [np.array(p) for p in parts.summary(tree_uri)["parents"]]
    priors = [selection.prior_part(sel, s) for s in range(len(uris))]
    assigned = [parts.join(work, "assign", parts.part_name(s)) for s in range(len(uris))]
    shared_first = parts.share(first)
    calls: list[tuple] = [(u, model_id, priors[s], s, shared_first) for s, u in enumerate(uris)]
    counted = parts.run_parts(balance.assign_part, calls, assigned, "curate balance: assign")
    phases.add("assign", counted)
    counts = [(np.array(c["clusters"], np.int64), np.array(c["counts"], np.int64)) for c in counted]
    sizes = np.zeros(len(first), np.int64)
    for c, k in counts:
        np.add.at(sizes, c, k)
    take = balance.spread(counts, balance.cluster_shares(sizes, parents, target), seed)
    phases.add("split")
    lineage = [parts.join(out, LINEAGE, parts.part_name(s)) for s in range(len(uris))]
    tree = [p.tolist() for p in parents]
    calls = [(u, model_id, priors[s], s, assigned[s], take[s], tree, seed) for s, u in enumerate(uris)]
    summaries = parts.run_parts(balance.select_part, calls, lineage, "curate balance: sample")
    phases.add("sample_images", summaries)
    step = {"step": "balance", "target": target, "levels": levels, "sample": sample, "resample": resample}
    return _write_selection(out, emb, meta, curation, step, summaries, phases, "balance")


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
    p.add_argument(
        "--sample", type=int, default=0, help="images k-means trains on (default 100 per cluster, at most 1 M)"
    )
    p.add_argument("--keep", choices=dedup.KEEP, default="closest", help="which image of a group stays")
    margin = dedup.DEFAULT_MARGIN
    p.add_argument(
        "--margin",
        type=float,
        default=margin,
        help=f"an image is also compared within its second nearest cluster when that is within this cosine of "
        f"the nearest (default {margin}; 0: its nearest cluster only)",
    )


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
    p.add_argument(
        "--sample",
        type=int,
        default=0,
        help="images the k-means tree trains on (default 100 per level-1 cluster, at most 1 M)",
    )


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.runtime import init_ray

    common = dict(model=args.model, sel=args.sel, overwrite=args.overwrite)
    # bad input: one line before Ray starts
    if args.curate_cmd == "dedup":
        check_dedup(args.emb, args.out, threshold=args.threshold, keep=args.keep, margin=args.margin, **common)
    elif args.curate_cmd == "decontaminate":
        check_decontaminate(args.emb, args.eval, args.out, **common)
    else:
        parse_levels(args.levels)
        check_balance(args.emb, args.out, target=args.target, **common)
    print(init_ray(args.address), file=sys.stderr)
    if args.curate_cmd == "dedup":
        kw = dict(clusters=args.clusters, sample=args.sample, keep=args.keep, seed=args.seed, margin=args.margin)
        curation = run_dedup(args.emb, args.out, threshold=args.threshold, **kw, **common)
    elif args.curate_cmd == "decontaminate":
        curation = run_decontaminate(args.emb, args.eval, args.out, threshold=args.threshold, **common)
    else:
        kw = dict(target=args.target, levels=parse_levels(args.levels), resample=args.resample, seed=args.seed)
        kw["sample"] = args.sample
        curation = run_balance(args.emb, args.out, **kw, **common)
    print(json.dumps({"out": args.out, **curation["counts"], "step": curation["steps"][-1]}))
