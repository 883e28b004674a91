"""An embedding set (EMB): what `raysl curate embed` writes and every other curate step reads.

EMB/embed.json names the shard set and the model (`model`: an identity string such as
`timm:resnet18@random-init,seed=0,size=64` or `run:/abs/run@step=200,size=64`); EMB/part-NNNNN.parquet
holds one input shard each: `key, embedding (float16), shard, row`, where `shard` is the
shard's position in the set's index and `row` the row's number in that shard file. The
model identity is also in each part's parquet metadata (`raysl.model`). Only JSON and
parquet are read: nothing is unpickled.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysl.errors import UserError

META = "embed.json"
MODEL_KEY = b"raysl.model"


def part_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


def emb_schema(dim: int, model: str) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("embedding", pa.list_(pa.float16(), dim), nullable=False),
            pa.field("shard", pa.int32(), nullable=False),
            pa.field("row", pa.int64(), nullable=False),
        ],
        metadata={MODEL_KEY: model.encode()},
    )


def read_meta(emb: str) -> dict:
    from raysl.data.schema import filesystem_and_path

    fs, root = filesystem_and_path(emb)
    path = f"{root.rstrip('/')}/{META}"
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except FileNotFoundError as exc:
        raise UserError(
            f"{emb}: no {META} here, so this is not an embedding set (make one with raysl curate embed)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from exc


def check_model(emb: str, meta: dict, model: str | None, flag: str = "--model") -> None:
    """A UserError when EMB was embedded with another model than `model` (an identity string,
    or just the timm/run name it starts with)."""
    have = meta.get("model", "")
    if (
        model
        and have != model
        and have.split("@", 1)[0] not in (model, f"timm:{model}", f"run:{os.path.abspath(model)}")
    ):
        raise UserError(f"{emb}: embedded with {have!r}, not with {model!r} ({flag}); embed again with that model")


def load(emb: str, model: str | None = None) -> tuple[dict, pa.Table, np.ndarray]:
    """(embed.json, table of key/shard/row, float32 embeddings (N, D) L2-normalised), rows in
    shard order. A UserError when a part is missing (an unfinished embed job) or of another model."""
    meta = read_meta(emb)
    check_model(emb, meta, model)
    tables = []
    for shard in range(meta["shards"]):
        path = os.path.join(emb, part_name(shard))
        if not os.path.exists(path):
            raise UserError(f"{path}: missing; the embed job did not finish (run it again, it resumes)")
        t = pq.read_table(path)
        got = (t.schema.metadata or {}).get(MODEL_KEY, b"").decode()
        if got != meta["model"]:
            raise UserError(f"{path}: embedded with {got!r}, {META} says {meta['model']!r}; embed again")
        tables.append(t)
    table = pa.concat_tables(tables) if tables else pa.table({"key": [], "shard": [], "row": []})
    if table.num_rows == 0:
        raise UserError(f"{emb}: holds no embeddings")
    x = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    x = x.reshape(table.num_rows, -1)
    return meta, table.drop_columns(["embedding"]), normalize(x)


def part_uris(emb: str, meta: dict) -> list[str]:
    """The part of every shard of EMB (a folder or a bucket URI); a UserError when one is
    missing (an unfinished embed job)."""
    from raysl.curate.parts import exists, join

    uris = [join(emb, part_name(s)) for s in range(meta["shards"])]
    for uri in uris:
        if not exists(uri):
            raise UserError(f"{uri}: missing; the embed job did not finish (run it again, it resumes)")
    return uris


def read_part(uri: str, model: str, columns: list[str] | None = None) -> pa.Table:
    """One part (its `columns`), refused when embedded with another model than `model`."""
    from raysl.data.schema import filesystem_and_path

    fs, path = filesystem_and_path(uri)
    with fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        got = (pf.schema_arrow.metadata or {}).get(MODEL_KEY, b"").decode()
        if got != model:
            raise UserError(f"{uri}: embedded with {got!r}, {META} says {model!r}; embed again")
        return pf.read(columns=columns)


def vectors(column) -> np.ndarray:
    """float32 unit rows (N, D) of an `embedding` column."""
    col = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    x = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), -1)
    return normalize(x)


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity = inner product)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
