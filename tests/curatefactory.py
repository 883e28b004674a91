"""Shard sets for `raysl curate` tests: planted photographs written as shards, and the model that embeds them."""

from raysl.data.schema import write_shard_set

FEATURES = dict(image_size=112, stage=0, input_norm="per-image")  # what raysl bench curate measures
MODEL = "resnet18"
PHOTOS = 6  # photographs, each with 4 planted copies: 30 images in 6 shards of 5


def write_rows(directory, rows, shard_size):
    """Shards of `rows` (key + image, plus any column given) with the other columns filled in."""
    base = dict(width=1, height=1, format="png", source="test", license="cc0-1.0", attribution="", label=None)
    write_shard_set(directory, [base | r for r in rows], shard_size=shard_size, sources=["test"])
    return directory


def write_embeddings(source, emb, vectors, model="test-model"):
    """EMB for the shard set `source` as `raysl curate embed` lays it out: one part per shard,
    rows in order, the embedding of row r of shard s being vectors[s][r] (float16)."""
    import json
    import os

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raysl.curate import embeddings
    from raysl.data.schema import read_manifest, shard_files

    manifest = read_manifest(source)
    os.makedirs(emb)
    with open(os.path.join(emb, embeddings.META), "w") as f:
        json.dump({"shards": len(manifest.shards), "source": source, "model": model, "image_size": 32}, f)
    for s, (path, _) in enumerate(shard_files(source, manifest)):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        x = np.asarray(vectors[s], np.float16)
        assert len(x) == len(keys)
        table = pa.table(
            {
                "key": keys,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), x.shape[1]),
                "shard": pa.array([s] * len(keys), pa.int32()),
                "row": pa.array(range(len(keys)), pa.int64()),
            },
            schema=embeddings.emb_schema(x.shape[1], model),
        )
        pq.write_table(table, os.path.join(emb, embeddings.part_name(s)))
    return emb
