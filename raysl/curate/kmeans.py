"""Spherical k-means with faiss (cosine on L2-normalised rows), seeded; and its two-level
form for many clusters, whose coarse cells also make the nearest-centroid search cheap."""

from __future__ import annotations

import numpy as np

TWO_LEVEL_FROM = 64  # clusters from which `fit` goes through coarse cells (about sqrt(clusters) of them)


def kmeans(x: np.ndarray, k: int, *, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', D), assignment (N,) int64) of unit rows `x`; k' = min(k, N)."""
    import faiss

    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(k, len(x)))
    if k == 1:
        c = x.mean(0, keepdims=True)
        return c / max(np.linalg.norm(c), 1e-12), np.zeros(len(x), np.int64)
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=iters,
        seed=seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,
    )
    km.train(x)
    _, assign = km.index.search(x, 1)
    assert km.centroids is not None  # set by train
    return km.centroids, assign[:, 0].astype(np.int64)


def coarse_cells(k: int) -> int:
    """Coarse cells of `fit` for k clusters: 1 (plain k-means) below TWO_LEVEL_FROM, else ~sqrt(k)."""
    return 1 if k < TWO_LEVEL_FROM else int(round(np.sqrt(k)))


def fit(x: np.ndarray, k: int, *, coarse: int = 0, iters: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(centroids (k', D), coarse centroids (c, D)) of unit rows `x`. With c > 1 cells (0:
    coarse_cells(k)), two-level k-means as faiss.contrib.clustering.two_level_clustering: x
    in c cells, then each cell's rows in clusters of their own, as many as its share of x
    (centroids ordered by cell). Its cost grows with sqrt(k) rather than k; with c = 1 it is
    plain k-means (no coarse centroids)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    k = max(1, min(k, len(x)))
    cells = min(coarse or coarse_cells(k), k)
    if cells <= 1:
        return kmeans(x, k, iters=iters, seed=seed)[0], np.zeros((0, x.shape[1]), np.float32)
    top, cell = kmeans(x, cells, iters=iters, seed=seed)
    sizes = np.bincount(cell, minlength=len(top))
    # clusters per cell in proportion to its rows, summing to k (faiss's rebalance)
    per_cell = np.diff(np.concatenate([[0], np.cumsum(sizes) * k // len(x)]))
    fine = [
        kmeans(x[cell == c], max(1, int(per_cell[c])), iters=iters, seed=seed + 1 + c)[0]
        for c in range(len(top))
        if sizes[c]
    ]
    return np.concatenate(fine), top
