"""Balanced sampling over a hierarchical k-means tree (Vo et al. 2024, arXiv 2405.15613).

Level 1 clusters the embeddings into k_1 clusters; level l clusters the centroids of level
l-1 into k_l clusters, so every image has one cluster id per level. The paper adds
resampling steps between k-means iterations (re-fitting each level on points drawn evenly
from its clusters) to move centroids off dense regions; `resample` does that here.

Sampling is top-down: the target N is split evenly over the top-level clusters, a cluster
that holds fewer images than its share gives it all and the rest is split again over the
others (water-filling), and each cluster's share is split over its children the same way,
down to the images of a level-1 cluster, drawn at random (seeded).
"""

from __future__ import annotations

import numpy as np

from raysl.curate.assign import centroid_index, nearest
from raysl.curate.kmeans import kmeans


def _fit_level(points: np.ndarray, k: int, resample: int, rng, seed: int, iters: int):
    centroids, assign = kmeans(points, k, iters=iters, seed=seed)
    for _ in range(resample):  # refit on an equal draw from every cluster (the paper's resampling step)
        per = max(1, int(np.median(np.bincount(assign))))
        draw = np.concatenate(
            [
                rng.choice(m, min(per, len(m)), replace=False)
                for m in np.split(np.argsort(assign), np.cumsum(np.bincount(assign))[:-1])
                if len(m)
            ]
        )
        centroids, _ = kmeans(points[draw], k, iters=iters, seed=seed)
        assign = nearest(centroid_index(centroids), np.ascontiguousarray(points, np.float32))
    return centroids, assign


def fit_tree(
    x: np.ndarray, levels: list[int], *, resample: int = 0, seed: int = 0, iters: int = 20
) -> tuple[np.ndarray, list[np.ndarray]]:
    """(level-1 centroids, parents): parents[l] maps each cluster of level l+1 to its cluster
    of level l+2. Fitted on unit rows `x` (all images, or a sample of them)."""
    rng = np.random.default_rng(seed)
    points, first, parents = x, None, []
    for level, k in enumerate(levels):
        centroids, assign = _fit_level(points, k, resample, rng, seed + level, iters)
        if first is None:
            first = centroids
        else:
            parents.append(assign)
        points = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    assert first is not None  # levels is not empty
    return first, parents


def tree_ids(first_level: np.ndarray, parents: list[np.ndarray]) -> np.ndarray:
    """Cluster ids (N, levels) from each image's level-1 cluster."""
    ids = [np.asarray(first_level, np.int64)]
    for p in parents:
        ids.append(np.asarray(p, np.int64)[ids[-1]])
    return np.stack(ids, axis=1)


def hierarchical_kmeans(
    x: np.ndarray, levels: list[int], *, resample: int = 0, seed: int = 0, iters: int = 20
) -> np.ndarray:
    """Cluster ids (N, len(levels)) of unit rows `x`: column l is the image's cluster at level l+1."""
    first, parents = fit_tree(x, levels, resample=resample, seed=seed, iters=iters)
    return tree_ids(nearest(centroid_index(first), np.ascontiguousarray(x, np.float32)), parents)


def cluster_shares(sizes: np.ndarray, parents: list[np.ndarray], target: int) -> np.ndarray:
    """How many images each level-1 cluster (of `sizes` images) gives to a top-down balanced
    sample of `target`: the split of `balanced_sample`, on cluster counts only."""
    level_sizes = [np.asarray(sizes, np.int64)]
    for p in parents:
        level_sizes.append(np.bincount(p, weights=level_sizes[-1], minlength=int(p.max()) + 1).astype(np.int64))
    share = split_evenly(target, level_sizes[-1])
    for level in range(len(parents) - 1, -1, -1):
        p, child = parents[level], np.zeros(len(parents[level]), np.int64)
        order = np.argsort(p, kind="stable")
        groups, starts = np.unique(p[order], return_index=True)
        for q, members in zip(groups, np.split(order, starts[1:])):
            if share[q]:
                child[members] = split_evenly(int(share[q]), level_sizes[level][members])
        share = child
    return share


def split_evenly(target: int, sizes: np.ndarray) -> np.ndarray:
    """Shares of `target` over groups of `sizes`: as equal as possible, none above its size."""
    share = np.zeros(len(sizes), np.int64)
    left, open_ = target, np.flatnonzero(sizes > 0)
    while left > 0 and len(open_):
        each = left // len(open_)
        if each == 0:  # fewer images left than groups: one each to the largest remaining
            pick = open_[np.argsort(-(sizes[open_] - share[open_]), kind="stable")[:left]]
            share[pick] += 1
            break
        add = np.minimum(each, sizes[open_] - share[open_])
        share[open_] += add
        left -= int(add.sum())
        open_ = open_[share[open_] < sizes[open_]]
    return share


def balanced_sample(ids: np.ndarray, target: int, *, seed: int = 0) -> np.ndarray:
    """Rows (sorted) of a top-down balanced sample of `target` images from cluster ids (N, L)."""
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []

    def descend(rows: np.ndarray, level: int, n: int) -> None:
        if n <= 0:
            return
        if level < 0:
            chosen.append(rng.choice(rows, n, replace=False))
            return
        groups, inverse = np.unique(ids[rows, level], return_inverse=True)
        members = [rows[inverse == g] for g in range(len(groups))]
        for m, share in zip(members, split_evenly(n, np.array([len(m) for m in members]))):
            descend(m, level - 1, int(share))

    descend(np.arange(len(ids)), ids.shape[1] - 1, target)
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


# As tasks over parts (see steps.run_balance): each part's candidates get their level-1
# cluster and the part's count per cluster; the shares are split on the counts; each
# cluster's share is spread over the parts that hold its images (a multivariate
# hypergeometric draw, so the sample is uniform within the cluster); each part then draws
# its images of each cluster and writes its lineage.


def assign_part(emb_uri: str, model: str, prior_uri: str | None, shard: int, centroids, out: str) -> dict:
    """The level-1 cluster of each candidate of one part (pos, cluster) and its counts."""
    import pyarrow as pa

    from raysl.curate import parts
    from raysl.curate.assign import candidate_vectors

    rows, x, _, _ = candidate_vectors(emb_uri, model, prior_uri)
    cluster = nearest(centroid_index(centroids), x) if len(rows) else np.zeros(0, np.int64)
    clusters, counts = np.unique(cluster, return_counts=True)
    table = pa.table({"pos": pa.array(rows, pa.int64()), "cluster": pa.array(cluster, pa.int64())})
    return parts.write(table, out, {"clusters": clusters.tolist(), "counts": counts.tolist()})


def spread(counts: list[tuple[np.ndarray, np.ndarray]], shares: np.ndarray, seed: int) -> list[dict[int, int]]:
    """For each part, how many images of each cluster it gives: `counts` (clusters, counts)
    per part; each cluster's share drawn over its parts without replacement."""
    rng = np.random.default_rng(seed)
    part = np.concatenate([np.full(len(c), i) for i, (c, _) in enumerate(counts)])
    cluster = np.concatenate([c for c, _ in counts]).astype(np.int64)
    count = np.concatenate([n for _, n in counts]).astype(np.int64)
    take: list[dict[int, int]] = [{} for _ in counts]
    order = np.argsort(cluster, kind="stable")
    groups, starts = np.unique(cluster[order], return_index=True)
    for c, at in zip(groups, np.split(order, starts[1:])):
        if shares[c]:
            for i, n in zip(part[at], rng.multivariate_hypergeometric(count[at], int(shares[c]))):
                if n:
                    take[int(i)][int(c)] = int(n)
    return take


def select_part(
    emb_uri: str,
    model: str,
    prior_uri: str | None,
    shard: int,
    assign_uri: str,
    take: dict,
    parents: list,
    seed: int,
    out: str,
) -> dict:
    """One part's lineage: of each cluster, `take[cluster]` of its candidates drawn at random
    (seeded), the others dropped; every candidate's cluster per level."""
    import pyarrow.parquet as pq

    from raysl.curate import embeddings, parts, selection

    cols = selection.start(embeddings.read_part(emb_uri, model, ["key", "shard", "row"]), prior_uri)
    fs, path = parts.fs_path(assign_uri)
    assigned = pq.read_table(path, filesystem=fs)
    pos, cluster = assigned.column("pos").to_numpy(), assigned.column("cluster").to_numpy()
    rng = np.random.default_rng([seed, shard])
    kept = []
    order = np.argsort(cluster, kind="stable")
    groups, starts = np.unique(cluster[order], return_index=True)
    for c, at in zip(groups, np.split(order, starts[1:])):
        n = int(take.get(int(c), take.get(str(int(c)), 0)))
        if n:
            kept.append(pos[rng.choice(at, n, replace=False)] if n < len(at) else pos[at])
    ids = tree_ids(cluster, [np.asarray(p) for p in parents]).tolist()
    for p, c in zip(pos.tolist(), ids):
        cols["clusters"][p] = c
    selection.drop(cols, np.setdiff1d(pos, np.concatenate(kept) if kept else []), "balance")
    return selection.finish(cols, out, shard)
