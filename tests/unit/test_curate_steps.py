"""raysl curate's steps without Ray: selection masks, balanced sampling and semantic dedup on
planted data."""

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysl.curate import balance, dedup, embeddings
from raysl.curate.planted import entropy_fraction
from raysl.data.shard_index import INDEX_SCHEMA, mask_rows, pack_rows, read_index


def test_mask_round_trip_and_old_indexes_read_as_whole_files(tmp_path):
    assert mask_rows(pack_rows([0, 3, 9], 10)).tolist() == [0, 3, 9]
    assert mask_rows(None) is None
    old = pa.table({"file": ["a.parquet"], "rows": [4], "bytes": [1], "sources": [["s"]]})  # no mask column
    pq.write_table(old, tmp_path / "index.parquet")
    index = read_index(pafs.LocalFileSystem(), str(tmp_path / "index.parquet"))
    assert index.masks() == [None] and INDEX_SCHEMA.names[-1] == "mask"


def test_balanced_sample_evens_out_a_long_tail():
    rng = np.random.default_rng(0)
    centres = embeddings.normalize(rng.standard_normal((10, 32)))
    labels = np.concatenate([np.zeros(500, int), np.repeat(np.arange(1, 10), 50)])  # class 0: 500 of 950
    x = embeddings.normalize(centres[labels] + 0.1 * rng.standard_normal((950, 32)))
    ids = balance.hierarchical_kmeans(x, [20, 10], seed=0)
    picked = balance.balanced_sample(ids, 200, seed=0)
    assert len(picked) == len(set(picked)) == 200
    before, after = entropy_fraction(labels), entropy_fraction(labels[picked])
    assert before < 0.85 and after > 0.95, (before, after)
    assert balance.split_evenly(10, np.array([1, 8, 8])).tolist() == [1, 5, 4]


def test_semdedup_finds_planted_near_copies_in_random_vectors():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2000, 64)).astype(np.float32)
    src = rng.choice(2000, 100, replace=False)
    x[:100] = x[src] + 0.02 * rng.standard_normal((100, 64))  # rows 0..99 copy other rows
    found = dedup.semdedup(embeddings.normalize(x), clusters=20, threshold=0.95)
    dropped = np.flatnonzero(found["duplicate_of"] >= 0)
    pairs = {frozenset((i, int(s))) for i, s in zip(range(100), src)}
    assert all(frozenset((int(i), int(found["duplicate_of"][i]))) in pairs for i in dropped)
    assert len(dropped) >= 95


def _unit(a):
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)).astype(np.float32)


def test_near_copies_across_a_cluster_boundary_meet_within_the_margin():
    """Two blobs, and 10 pairs of near-copies astride the boundary between them: in its
    nearest cluster only (margin 0) an image never meets its copy; within the margin, one of
    each pair is dropped as a copy of the other, and nothing else."""
    rng = np.random.default_rng(0)
    d = 32
    e0, e1 = np.eye(d)[0], np.eye(d)[1]
    blobs = _unit(np.concatenate([e0 + 0.1 * rng.standard_normal((100, d)), e1 + 0.1 * rng.standard_normal((100, d))]))
    off = rng.standard_normal((10, d)) * 0.3
    off[:, :2] = 0  # the pair's middle is as close to one blob as to the other
    middle = e0 + e1 + off
    a, b = _unit(middle + 0.1 * (e0 - e1)), _unit(middle - 0.1 * (e0 - e1))  # cosine ~0.99
    x = np.concatenate([blobs, a, b])
    pair = {200 + i: 210 + i for i in range(10)} | {210 + i: 200 + i for i in range(10)}
    alone = dedup.semdedup(x, clusters=2, threshold=0.95, margin=0, coarse=1)
    astride = [i for i in range(200, 210) if alone["cluster"][i] != alone["cluster"][pair[i]]]
    assert len(astride) >= 8 and all(
        alone["duplicate_of"][i] < 0 and alone["duplicate_of"][pair[i]] < 0 for i in astride
    )
    found = dedup.semdedup(x, clusters=2, threshold=0.95, margin=0.3, coarse=1)
    dropped = np.flatnonzero(found["duplicate_of"] >= 0)
    assert len(dropped) == 10 and all(found["duplicate_of"][i] == pair[i] for i in dropped)
    assert np.array_equal(found["cluster"], alone["cluster"])


def test_two_level_kmeans_and_its_inverted_file_find_the_nearest_centroid():
    from raysl.curate.assign import centroid_index, nearest, nearest_two
    from raysl.curate.kmeans import fit

    rng = np.random.default_rng(0)
    centres = _unit(rng.standard_normal((100, 32)))
    x = _unit(np.repeat(centres, 20, axis=0) + 0.05 * rng.standard_normal((2000, 32)))
    centroids, top = fit(x, 100, iters=10)
    assert len(top) == 10 and 100 <= len(centroids) <= 110
    exact = nearest_two(centroid_index(centroids), x)
    ids, sims = nearest_two(centroid_index(centroids, top), x)
    assert np.mean(ids[:, 0] == exact[0][:, 0]) > 0.99
    assert np.all(sims[:, 0] >= sims[:, 1]) and np.all(sims[:, 0] <= exact[1][:, 0] + 1e-5)
    assert np.array_equal(nearest(centroid_index(centroids, top), x), ids[:, 0])
