"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540): cluster the embeddings with k-means, then
within each cluster drop all but one of every group of images whose cosine similarity is
above a threshold.

Within a cluster, faiss finds every pair above the threshold (`range_search` on an inner
product index of the cluster: memory grows with the pairs found, not with the cluster
size squared). Images are then visited in keep order (`closest`: closest to the cluster
centroid first, as SemDeDup ranks them; `farthest`; `first`: set order) and each image not
yet dropped keeps its place and drops every later neighbour above the threshold, which
points at it as `duplicate_of`. Clusters are independent: at scale, each is one task.
"""

from __future__ import annotations

import numpy as np

from raysl.curate.kmeans import kmeans

KEEP = ("closest", "farthest", "first")
DEFAULT_THRESHOLD = 0.985  # measured on planted near-duplicates (raysl bench curate)


def dedup_cluster(x: np.ndarray, order: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of (n,) int64: -1 kept, else the position of the kept image it copies;
    similarity to it (n,) float32) for the unit rows `x` of one cluster, visited in `order`."""
    import faiss

    n = len(x)
    dup_of = np.full(n, -1, np.int64)
    sim = np.zeros(n, np.float32)
    if n < 2:
        return dup_of, sim
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    lims, dists, ids = index.range_search(x, threshold)
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    for i in order:
        if dup_of[i] >= 0:
            continue
        nbrs, s = ids[lims[i] : lims[i + 1]], dists[lims[i] : lims[i + 1]]
        later = (rank[nbrs] > rank[i]) & (dup_of[nbrs] < 0)
        dup_of[nbrs[later]] = i
        sim[nbrs[later]] = s[later]
    return dup_of, sim


def semdedup(
    x: np.ndarray,
    *,
    clusters: int,
    threshold: float = DEFAULT_THRESHOLD,
    keep: str = "closest",
    seed: int = 0,
    iters: int = 20,
) -> dict:
    """For unit rows `x`: {"cluster": (N,), "duplicate_of": (N,) row or -1, "similarity": (N,),
    "seconds": {"kmeans": s, "dedup": s}}."""
    import time

    start = time.perf_counter()
    centroids, assign = kmeans(x, clusters, iters=iters, seed=seed)
    kmeans_s = time.perf_counter() - start
    dup_of = np.full(len(x), -1, np.int64)
    sim = np.zeros(len(x), np.float32)
    by_cluster = np.argsort(assign, kind="stable")
    bounds = np.searchsorted(assign[by_cluster], np.arange(len(centroids) + 1))
    for c in range(len(centroids)):
        members = by_cluster[bounds[c] : bounds[c + 1]]
        if len(members) < 2:
            continue
        xc = np.ascontiguousarray(x[members])
        if keep == "first":
            order = np.arange(len(members))
        else:
            to_centroid = xc @ centroids[c]
            order = np.argsort(-to_centroid if keep == "closest" else to_centroid, kind="stable")
        d, s = dedup_cluster(xc, order, threshold)
        hit = d >= 0
        dup_of[members[hit]] = members[d[hit]]
        sim[members[hit]] = s[hit]
    seconds = {"kmeans": round(kmeans_s, 2), "dedup": round(time.perf_counter() - start - kmeans_s, 2)}
    return {"cluster": assign, "duplicate_of": dup_of, "similarity": sim, "seconds": seconds}
