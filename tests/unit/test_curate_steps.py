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
