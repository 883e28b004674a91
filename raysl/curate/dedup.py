"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540): cluster the embeddings with k-means, then
within each cluster drop all but one of every group of images whose cosine similarity is
above a threshold.

Within a cluster, every pair above the threshold is found by inner products of blocks of
1,024 rows against the cluster (BLAS; memory grows with the cluster size and the pairs
found, not with its square). Images are then visited in keep order (`closest`: closest to the cluster
centroid first, as SemDeDup ranks them; `farthest`; `first`: set order) and each image not
yet dropped keeps its place and drops every later neighbour above the threshold, which
points at it as `duplicate_of`. Clusters are independent: at scale, each is one task.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from raysl.curate import embeddings, parts
from raysl.curate.kmeans import kmeans

KEEP = ("closest", "farthest", "first")
DEFAULT_THRESHOLD = 0.985  # measured on planted near-duplicates (raysl bench curate)


def dedup_cluster(
    x: np.ndarray, order: np.ndarray, threshold: float, block: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of (n,) int64: -1 kept, else the position of the kept image it copies;
    similarity to it (n,) float32) for the unit rows `x` of one cluster, visited in `order`."""
    n = len(x)
    dup_of = np.full(n, -1, np.int64)
    sim = np.zeros(n, np.float32)
    if n < 2:
        return dup_of, sim
    found_i, found_j, found_s = [], [], []
    for lo in range(0, n, block):  # block x n similarities at a time (BLAS)
        s = x[lo : lo + block] @ x.T
        i, j = np.nonzero(s > threshold)
        other = i + lo != j
        found_i.append(i[other] + lo)
        found_j.append(j[other])
        found_s.append(s[i[other], j[other]])
    pi, pj, ps = np.concatenate(found_i), np.concatenate(found_j), np.concatenate(found_s)
    if not len(pi):
        return dup_of, sim
    lims = np.searchsorted(pi, np.arange(n + 1))  # pairs are in row order
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    for i in order[(lims[1:] > lims[:-1])[order]]:  # only images with a neighbour above the threshold
        if dup_of[i] >= 0:
            continue
        nbrs, si = pj[lims[i] : lims[i + 1]], ps[lims[i] : lims[i + 1]]
        later = (rank[nbrs] > rank[i]) & (dup_of[nbrs] < 0)
        dup_of[nbrs[later]] = i
        sim[nbrs[later]] = si[later]
    return dup_of, sim


def dedup_clusters(
    x: np.ndarray, assign: np.ndarray, centroids: np.ndarray, threshold: float, keep: str
) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of (n,) row or -1, similarity (n,)) for unit rows `x` in set order, each in
    cluster `assign` (an index into `centroids`), every cluster deduplicated on its own."""
    dup_of = np.full(len(x), -1, np.int64)
    sim = np.zeros(len(x), np.float32)
    by_cluster = np.argsort(assign, kind="stable")  # each cluster's rows in set order
    clusters, starts = np.unique(assign[by_cluster], return_index=True)
    for c, members in zip(clusters, np.split(by_cluster, starts[1:])):
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
    """In one process, for unit rows `x` that fit in its memory: {"cluster": (N,),
    "duplicate_of": (N,) row or -1, "similarity": (N,), "seconds": {"kmeans": s, "dedup": s}}."""
    import time

    start = time.perf_counter()
    centroids, assign = kmeans(x, clusters, iters=iters, seed=seed)
    kmeans_s = time.perf_counter() - start
    dup_of, sim = dedup_clusters(x, assign, centroids, threshold, keep)
    seconds = {"kmeans": round(kmeans_s, 2), "dedup": round(time.perf_counter() - start - kmeans_s, 2)}
    return {"cluster": assign, "duplicate_of": dup_of, "similarity": sim, "seconds": seconds}


# The same, as tasks over parts (see steps.run_dedup): the candidates of each embedding part
# are assigned to the nearest centroid and written in blocks by cluster group (an Arrow IPC
# file, one record batch per group); each group's blocks, gathered from every part, are
# deduplicated by one task, which writes its drops in blocks by part; each part's lineage
# then gathers its drops. A task reads only its block of each file (the IPC footer lists
# where each batch is), so the all-to-all exchange costs one small read per block.


def rows_of(assign_uri: str) -> str:
    """Where the assignment task of a part writes its candidates grouped by cluster group."""
    return assign_uri.removesuffix(".parquet") + ".arrow"


def assign_part(emb_uri: str, model: str, prior_uri: str | None, shard: int, centroids, group_of, out: str) -> dict:
    """The candidates of one part with their cluster, in blocks by cluster group (rows_of),
    then `out`: each candidate's position and cluster (its lineage's)."""
    import pyarrow as pa

    from raysl.curate.assign import candidate_vectors, centroid_index, nearest

    rows, x, _, table = candidate_vectors(emb_uri, model, prior_uri)
    cluster = nearest(centroid_index(centroids), x) if len(rows) else np.zeros(0, np.int64)
    group = np.asarray(group_of)[cluster]
    order = np.lexsort((rows, group))
    rows, cluster, group = rows[order], cluster[order], group[order]
    grouped = pa.table(
        {
            "pos": pa.array(rows, pa.int64()),
            "cluster": pa.array(cluster, pa.int64()),
            "key": table.column("key").take(rows),
            "embedding": table.column("embedding").take(rows),
        }
    )
    groups, sizes = np.unique(group, return_counts=True)
    parts.write_blocks(grouped, rows_of(out), "groups", groups.tolist(), sizes.tolist())
    return parts.write(grouped.select(["pos", "cluster"]), out, {"rows": len(rows)})


def dedup_group(assign_uris: list[str], group: int, centroids, threshold: float, keep: str, out: str) -> dict:
    """SemDeDup of one cluster group: its rows from every part, in set order; writes the
    dropped rows (part, pos, duplicate_of key, similarity), by part."""
    import pyarrow as pa

    tables, part_of = [], []
    for shard, uri in enumerate(assign_uris):
        t = parts.read_block(rows_of(uri), "groups", group)
        if t is not None and t.num_rows:
            tables.append(t)
            part_of.append(np.full(t.num_rows, shard, np.int32))
    if tables:
        t = pa.concat_tables(tables)
        part = np.concatenate(part_of)
        x = embeddings.vectors(t.column("embedding"))
        dup_of, sim = dedup_clusters(x, t.column("cluster").to_numpy(), centroids, threshold, keep)
        hit = np.flatnonzero(dup_of >= 0)
        dropped = pa.table(
            {
                "pos": t.column("pos").take(hit),
                "duplicate_of": t.column("key").take(dup_of[hit]),
                "similarity": pa.array(sim[hit], pa.float32()),
            }
        )
        part = part[hit]  # set order: sorted by part already
    else:
        dropped = pa.table({"pos": pa.array([], pa.int64()), "duplicate_of": pa.array([], pa.string())})
        dropped = dropped.append_column("similarity", pa.array([], pa.float32()))
        part = np.zeros(0, np.int32)
    in_parts, sizes = np.unique(part, return_counts=True)
    summary = {"rows": int(sum(len(p) for p in part_of)), "dropped": len(part)}
    return parts.write_blocks(dropped, out, "parts", in_parts.tolist(), sizes.tolist(), summary)


def lineage_part(
    emb_uri: str, model: str, prior_uri: str | None, shard: int, assign_uri: str, drop_uris: list[str], out: str
) -> dict:
    """One part's lineage: its candidates' clusters, and the drops of every group in it."""
    from raysl.curate import selection

    ids = embeddings.read_part(emb_uri, model, ["key", "shard", "row"])
    cols = selection.start(ids, prior_uri)
    fs, path = parts.fs_path(assign_uri)
    assigned = pq.read_table(path, columns=["pos", "cluster"], filesystem=fs)
    cols["dedup_cluster"][assigned.column("pos").to_numpy()] = assigned.column("cluster").to_numpy()
    for uri in drop_uris:
        t = parts.read_block(uri, "parts", shard)
        if t is None:
            continue
        pos = t.column("pos").to_numpy()
        cols["duplicate_of"][pos] = t.column("duplicate_of").to_pylist()
        cols["similarity"][pos] = t.column("similarity").to_numpy()
        selection.drop(cols, pos, "duplicate")
    return selection.finish(cols, out, shard)
