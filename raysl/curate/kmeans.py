"""Spherical k-means with faiss (cosine on L2-normalised rows), seeded."""

from __future__ import annotations

import numpy as np


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
