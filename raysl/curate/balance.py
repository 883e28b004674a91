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

from raysl.curate.kmeans import kmeans


def hierarchical_kmeans(
    x: np.ndarray, levels: list[int], *, resample: int = 0, seed: int = 0, iters: int = 20
) -> np.ndarray:
    """Cluster ids (N, len(levels)): column l is the image's cluster at level l+1."""
    ids = np.zeros((len(x), len(levels)), np.int64)
    points, owner = x, np.arange(len(x))  # points of this level; owner: point of each image
    rng = np.random.default_rng(seed)
    for level, k in enumerate(levels):
        centroids, assign = kmeans(points, k, iters=iters, seed=seed + level)
        for _ in range(resample):  # refit on an equal draw from every cluster (the paper's resampling step)
            per = max(1, int(np.median(np.bincount(assign))))
            draw = np.concatenate(
                [
                    rng.choice(m, min(per, len(m)), replace=False)
                    for m in np.split(np.argsort(assign), np.cumsum(np.bincount(assign))[:-1])
                    if len(m)
                ]
            )
            centroids, _ = kmeans(points[draw], k, iters=iters, seed=seed + level)
            import faiss

            index = faiss.IndexFlatIP(centroids.shape[1])
            index.add(np.ascontiguousarray(centroids, np.float32))
            assign = index.search(np.ascontiguousarray(points, np.float32), 1)[1][:, 0].astype(np.int64)
        ids[:, level] = assign[owner]
        used = np.unique(assign)
        points = centroids[used] / np.maximum(np.linalg.norm(centroids[used], axis=1, keepdims=True), 1e-12)
        owner = np.searchsorted(used, assign[owner])
    return ids


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
