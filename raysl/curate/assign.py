"""K-means at any scale: trained in one process on a sample of the candidates whose size is a
setting, then every embedding part assigned to the nearest centroid by a task of its own.

The sample is drawn part by part (a task each keeps every candidate with probability
sample / candidates, seeded per part), so the process that trains holds the sample only. A
sample at least as large as the set is the whole set in set order: the clusters are then
those of k-means on all embeddings in one process.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from raysl.curate import embeddings, parts, selection


def candidate_vectors(
    emb_uri: str, model: str, prior_uri: str | None, fraction: float = 1.0, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, dict, pa.Table]:
    """(positions of the candidates in the part, their unit vectors, lineage columns, the
    part's table); `fraction` < 1: each candidate kept with that probability (seeded per part)."""
    table = embeddings.read_part(emb_uri, model)
    cols = selection.start(table.select(["key", "shard", "row"]), prior_uri)
    rows = selection.candidates(cols)
    if fraction < 1:
        shard = int(table.column("shard")[0].as_py()) if table.num_rows else 0
        rows = rows[np.random.default_rng([seed, shard]).random(len(rows)) < fraction]
    x = embeddings.vectors(table.column("embedding").take(rows)) if len(rows) else np.zeros((0, 0), np.float32)
    return rows, x, cols, table


def sample_part(emb_uri: str, model: str, prior_uri: str | None, fraction: float, seed: int) -> np.ndarray:
    """The candidates of one part kept with probability `fraction` (all when >= 1)."""
    return candidate_vectors(emb_uri, model, prior_uri, fraction, seed)[1]


def draw_sample(emb_uris: list[str], model: str, sel: str | None, size: int, candidates: int, seed: int) -> np.ndarray:
    """About `size` unit vectors drawn evenly from all candidates (all of them, in set order,
    when `size` >= `candidates`)."""
    fraction = size / max(candidates, 1)
    calls = [(u, model, selection.prior_part(sel, s), fraction, seed) for s, u in enumerate(emb_uris)]
    drawn = [x for x in parts.map_tasks(sample_part, calls, "curate sample") if len(x)]
    return np.concatenate(drawn) if drawn else np.zeros((0, 1), np.float32)


PROBES = 8  # coarse cells searched per row when the centroids have coarse cells (kmeans.fit)


def centroid_index(centroids: np.ndarray, coarse: np.ndarray | None = None):
    """An inner-product index of the centroids (nearest centroid = highest cosine): exact, or
    with `coarse` centroids (kmeans.fit) an inverted file over them (faiss IndexIVFFlat)
    searching the PROBES closest cells, so a row costs ~(1 + PROBES) sqrt(k) products, not k."""
    import faiss

    centroids = np.ascontiguousarray(centroids, np.float32)
    if coarse is None or len(coarse) <= 1:
        flat = faiss.IndexFlatIP(centroids.shape[1])
        flat.add(centroids)
        return flat
    quantizer = faiss.IndexFlatIP(centroids.shape[1])
    quantizer.add(np.ascontiguousarray(coarse, np.float32))
    index = faiss.IndexIVFFlat(quantizer, centroids.shape[1], len(coarse), faiss.METRIC_INNER_PRODUCT)
    index.nprobe = min(PROBES, len(coarse))
    index.add(centroids)
    return index


def nearest(index, x: np.ndarray, batch: int = 65536) -> np.ndarray:
    """The nearest centroid of each row, in batches (bounded scratch memory)."""
    return nearest_two(index, x, batch)[0][:, 0]


def nearest_two(index, x: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """(ids (n, 2), cosines (n, 2)) of the two nearest centroids of each row (id -1 when
    there is one centroid), in batches."""
    ids = np.empty((len(x), 2), np.int64)
    sims = np.empty((len(x), 2), np.float32)
    for lo in range(0, len(x), batch):
        sims[lo : lo + batch], ids[lo : lo + batch] = index.search(np.ascontiguousarray(x[lo : lo + batch]), 2)
    return ids, sims


def pack_groups(sizes: np.ndarray, per_group: float) -> np.ndarray:
    """Group id of each cluster: consecutive clusters packed into groups of about `per_group`
    images (a larger cluster is a group of its own)."""
    group = np.zeros(len(sizes), np.int64)
    g, filled = 0, 0.0
    for c, n in enumerate(sizes):
        if filled and filled + n > per_group:
            g, filled = g + 1, 0.0
        group[c] = g
        filled += n
    return group
