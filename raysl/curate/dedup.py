"""SemDeDup (Abbas et al. 2023, arXiv 2303.09540): cluster the embeddings with k-means, then
within each cluster drop all but one of every group of images whose cosine similarity is
above a threshold.

Within a cluster, every pair above the threshold is found by inner products of blocks of
1,024 rows against the cluster (BLAS; memory grows with the cluster size and the pairs
found, not with its square). Images are then visited in keep order (`closest`: closest to the cluster
centroid first, as SemDeDup ranks them; `farthest`; `first`: set order) and each image not
yet dropped keeps its place and drops every later neighbour above the threshold, which
points at it as `duplicate_of`. Clusters are independent: at scale, each is one task.

Near-copies on two sides of a cluster boundary would never be compared: an image whose
second nearest centroid is within `margin` (cosine) of its nearest is a member of both
clusters (memberships), and the clusters' decisions are merged (dedup_clusters). Many
clusters are fitted in two levels (kmeans.fit), which also makes finding an image's
clusters cost ~sqrt(clusters) products instead of one per cluster.
"""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from raysl.curate import embeddings, parts
from raysl.curate.kmeans import fit

KEEP = ("closest", "farthest", "first")
DEFAULT_THRESHOLD = 0.985  # measured on planted near-duplicates (raysl bench curate)
DEFAULT_MARGIN = 0.01  # second cluster within this cosine of the nearest (raysl bench curate --parts scale)


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


def memberships(ids: np.ndarray, sims: np.ndarray, margin: float) -> tuple[np.ndarray, np.ndarray]:
    """(row, cluster) of every membership, in row order: each row in its nearest cluster
    (ids/sims from assign.nearest_two), and also in its second nearest when that is within
    `margin` (cosine) of the nearest, so a pair of near-copies on two sides of a cluster
    boundary still meets in one cluster."""
    second = np.flatnonzero((ids[:, 1] >= 0) & (sims[:, 1] >= sims[:, 0] - margin) & (margin > 0))
    rows = np.concatenate([np.arange(len(ids)), second]).astype(np.int64)
    cluster = np.concatenate([ids[:, 0], ids[second, 1]]).astype(np.int64)
    order = np.argsort(rows, kind="stable")
    return rows[order], cluster[order]


def dedup_clusters(
    x: np.ndarray,
    image: np.ndarray,
    cluster: np.ndarray,
    primary: np.ndarray,
    centroids: np.ndarray,
    threshold: float,
    keep: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate_of (n,) image or -1, similarity (n,)) of n images from their memberships:
    membership m is image[m] (0..n-1 in set order) with unit row x[m] in
    `cluster`[m], the image's nearest cluster being `primary`[m]. Every cluster is
    deduplicated on its own, its members visited in one order for all clusters (`closest`:
    highest cosine to the image's nearest centroid first; `farthest`; `first`: set order),
    so a pair met in two clusters is decided the same way in both. An image dropped in any
    cluster is dropped, as a copy of its most similar keeper there; each image copies one
    that comes earlier in that order, so every chain of copies ends at a kept image. With
    one membership per image: SemDeDup's decisions."""
    n = int(image.max()) + 1 if len(image) else 0
    if keep == "first":
        rank_key = image.astype(np.float64)
    else:
        score = (x * centroids[primary]).sum(1)  # row by row: the same bits in every task
        rank_key = -score if keep == "closest" else score
    found_img, found_of, found_sim = [], [], []
    by_cluster = np.argsort(cluster, kind="stable")  # each cluster's memberships in set order
    clusters, starts = np.unique(cluster[by_cluster], return_index=True)
    for members in np.split(by_cluster, starts[1:]):
        if len(members) < 2:
            continue
        order = np.argsort(rank_key[members], kind="stable")
        d, s = dedup_cluster(np.ascontiguousarray(x[members]), order, threshold)
        hit = d >= 0
        found_img.append(image[members[hit]])
        found_of.append(image[members[d[hit]]])
        found_sim.append(s[hit])
    dup_of = np.full(n, -1, np.int64)
    sim = np.zeros(n, np.float32)
    if found_img:
        img, of, si = np.concatenate(found_img), np.concatenate(found_of), np.concatenate(found_sim)
        pick = np.lexsort((-si, img))  # per image, its most similar keeper first
        first = np.unique(img[pick], return_index=True)[1]
        dup_of[img[pick][first]] = of[pick][first]
        sim[img[pick][first]] = si[pick][first]
    return dup_of, sim


def semdedup(
    x: np.ndarray,
    *,
    clusters: int,
    threshold: float = DEFAULT_THRESHOLD,
    keep: str = "closest",
    seed: int = 0,
    iters: int = 20,
    margin: float = DEFAULT_MARGIN,
    coarse: int = 0,
) -> dict:
    """In one process, for unit rows `x` that fit in its memory: {"cluster": (N,),
    "duplicate_of": (N,) row or -1, "similarity": (N,), "seconds": {"kmeans": s, "dedup": s}}.
    margin=0, coarse=1: SemDeDup as published (plain k-means, one cluster per image)."""
    import time

    from raysl.curate.assign import centroid_index, nearest_two

    start = time.perf_counter()
    centroids, top = fit(x, clusters, coarse=coarse, iters=iters, seed=seed)
    kmeans_s = time.perf_counter() - start
    ids, sims = nearest_two(centroid_index(centroids, top), np.ascontiguousarray(x, np.float32))
    rows, cluster = memberships(ids, sims, margin)
    dup_of, sim = dedup_clusters(x[rows], rows, cluster, ids[rows, 0], centroids, threshold, keep)
    seconds = {"kmeans": round(kmeans_s, 2), "dedup": round(time.perf_counter() - start - kmeans_s, 2)}
    return {"cluster": ids[:, 0], "duplicate_of": dup_of, "similarity": sim, "seconds": seconds}


# The same, as tasks over parts (see steps.run_dedup): the candidates of each embedding part
# are assigned to their clusters and written in blocks by cluster group (an Arrow IPC file,
# one record batch per group; a candidate in two clusters of two groups is in both blocks);
# each group's blocks, gathered from every part, are deduplicated by one task, which writes
# its drops in blocks by part; each part's lineage then gathers its drops. A task reads only
# its block of each file (the IPC footer lists where each batch is), so the all-to-all
# exchange costs one small read per block.


def rows_of(assign_uri: str) -> str:
    """Where the assignment task of a part writes its candidates grouped by cluster group."""
    return assign_uri.removesuffix(".parquet") + ".arrow"


def assign_part(
    emb_uri: str, model: str, prior_uri: str | None, shard: int, centroids, coarse, group_of, margin: float, out: str
) -> dict:
    """The memberships of one part's candidates (memberships), in blocks by cluster group
    (rows_of), then `out`: each candidate's position and nearest cluster (its lineage's)."""
    import pyarrow as pa

    from raysl.curate.assign import candidate_vectors, centroid_index, nearest_two

    rows, x, _, table = candidate_vectors(emb_uri, model, prior_uri)
    if len(rows):
        ids, sims = nearest_two(centroid_index(centroids, coarse), x)
    else:
        ids, sims = np.zeros((0, 2), np.int64), np.zeros((0, 2), np.float32)
    member, cluster = memberships(ids, sims, margin)
    group = np.asarray(group_of)[cluster]
    order = np.lexsort((member, group))
    member, cluster, group = member[order], cluster[order], group[order]
    grouped = pa.table(
        {
            "pos": pa.array(rows[member], pa.int64()),
            "cluster": pa.array(cluster, pa.int64()),
            "primary": pa.array(ids[member, 0], pa.int64()),
            "key": table.column("key").take(rows[member]),
            "embedding": table.column("embedding").take(rows[member]),
        }
    )
    groups, sizes = np.unique(group, return_counts=True)
    parts.write_blocks(grouped, rows_of(out), "groups", groups.tolist(), sizes.tolist())
    nearest = pa.table({"pos": pa.array(rows, pa.int64()), "cluster": pa.array(ids[:, 0], pa.int64())})
    return parts.write(nearest, out, {"rows": len(rows), "memberships": len(member)})


def dedup_group(assign_uris: list[str], group: int, centroids, threshold: float, keep: str, out: str) -> dict:
    """SemDeDup of one cluster group: its memberships from every part, in set order; writes
    the dropped rows (part, pos, duplicate_of key, similarity), by part."""
    import pyarrow as pa

    tables, part_of = [], []
    for shard, uri in enumerate(assign_uris):
        t = parts.read_block(rows_of(uri), "groups", group)
        if t is not None and t.num_rows:
            tables.append(t)
            part_of.append(np.full(t.num_rows, shard, np.int64))
    if tables:
        t = pa.concat_tables(tables)
        part = np.concatenate(part_of)
        # images in set order (part, pos); an image in two clusters of this group is one image
        first, image = np.unique((part << 32) | t.column("pos").to_numpy(), return_index=True, return_inverse=True)[1:]
        x = embeddings.vectors(t.column("embedding"))
        dup_of, sim = dedup_clusters(
            x, image, t.column("cluster").to_numpy(), t.column("primary").to_numpy(), centroids, threshold, keep
        )
        hit = np.flatnonzero(dup_of >= 0)
        dropped = pa.table(
            {
                "pos": t.column("pos").take(first[hit]),
                "duplicate_of": t.column("key").take(first[dup_of[hit]]),
                "similarity": pa.array(sim[hit], pa.float32()),
            }
        )
        part = part[first[hit]]  # set order: sorted by part already
    else:
        dropped = pa.table({"pos": pa.array([], pa.int64()), "duplicate_of": pa.array([], pa.string())})
        dropped = dropped.append_column("similarity", pa.array([], pa.float32()))
        part = np.zeros(0, np.int64)
    in_parts, sizes = np.unique(part, return_counts=True)
    summary = {"rows": int(sum(len(p) for p in part_of)), "dropped": len(part)}
    return parts.write_blocks(dropped, out, "parts", in_parts.tolist(), sizes.tolist(), summary)


def lineage_part(
    emb_uri: str, model: str, prior_uri: str | None, shard: int, assign_uri: str, drop_uris: list[str], out: str
) -> dict:
    """One part's lineage: its candidates' clusters, and the drops of every group in it."""
    import pyarrow as pa

    from raysl.curate import selection

    ids = embeddings.read_part(emb_uri, model, ["key", "shard", "row"])
    cols = selection.start(ids, prior_uri)
    fs, path = parts.fs_path(assign_uri)
    assigned = pq.read_table(path, columns=["pos", "cluster"], filesystem=fs)
    cols["dedup_cluster"][assigned.column("pos").to_numpy()] = assigned.column("cluster").to_numpy()
    found = [t for t in (parts.read_block(uri, "parts", shard) for uri in drop_uris) if t is not None]
    if found:
        # an image dropped by two groups (a member of clusters of both): its most similar keeper
        t = pa.concat_tables(found)
        sim = t.column("similarity").to_numpy()
        pick = np.lexsort((-sim, t.column("pos").to_numpy()))
        t = t.take(pick).take(np.unique(t.column("pos").to_numpy()[pick], return_index=True)[1])
        pos = t.column("pos").to_numpy()
        cols["duplicate_of"][pos] = t.column("duplicate_of").to_pylist()
        cols["similarity"][pos] = t.column("similarity").to_numpy()
        selection.drop(cols, pos, "duplicate")
    return selection.finish(cols, out, shard)
