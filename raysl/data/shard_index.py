"""The shard index: one row per shard file of a set (file, rows, bytes, sources), as parquet.

At 1 M shards a list of dicts in manifest.json is 70 MB of JSON and a second to parse
on every process; the same list as parquet is a few MB and its columns load straight
into arrays. In memory the index stays columnar: `rows` is a numpy array (what planning
reads), the file names and sources stay an Arrow table and become Python strings only
for the shards a caller asks for.
"""

from __future__ import annotations

import posixpath
from typing import overload

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

INDEX = "index.parquet"

INDEX_SCHEMA = pa.schema(
    [
        pa.field("file", pa.string(), nullable=False),  # name inside the set's directory
        pa.field("rows", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),  # size of the file on storage
        pa.field("sources", pa.list_(pa.string()), nullable=False),  # SRC names its rows came from
        # A selection (raysl curate): bit i set (np.packbits order) = row i of `file` is in the set,
        # and `rows` counts the set bits; null = every row. Older indexes read back as all null.
        pa.field("mask", pa.binary(), nullable=True),
    ]
)


class ShardIndex:
    """The shards of a set, in set order (the order planning permutes)."""

    def __init__(self, table: pa.Table | None = None):
        self.table = (
            INDEX_SCHEMA.empty_table() if table is None else table.select(INDEX_SCHEMA.names).cast(INDEX_SCHEMA)
        )
        self.rows = self.table.column("rows").to_numpy()  # int64, one per shard

    @classmethod
    def from_columns(cls, file, rows, bytes=None, sources=None, masks=None) -> ShardIndex:
        n = len(file)
        return cls(
            pa.table(
                {
                    "file": pa.array(file, pa.string()),
                    "rows": pa.array(rows, pa.int64()),
                    "bytes": pa.array(np.zeros(n, np.int64) if bytes is None else bytes, pa.int64()),
                    "sources": pa.array([[]] * n if sources is None else sources, pa.list_(pa.string())),
                    "mask": pa.array([None] * n if masks is None else masks, pa.binary()),
                },
                schema=INDEX_SCHEMA,
            )
        )

    def __len__(self) -> int:
        return self.table.num_rows

    def __getitem__(self, i: int) -> dict:
        return self.table.slice(i, 1).to_pylist()[0]

    def __iter__(self):  # dicts, for small sets and tests; planning uses the arrays
        return iter(self.table.to_pylist())

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardIndex) and self.table.equals(other.table)

    def __repr__(self) -> str:
        return f"ShardIndex({len(self)} shards, {int(self.rows.sum())} rows)"

    def files(self, indices=None) -> list[str]:
        """File names of all shards, or of `indices` (in that order)."""
        column = self.table.column("file")
        return (column if indices is None else column.take(pa.array(indices, pa.int64()))).to_pylist()

    def masks(self, indices=None) -> list[bytes | None]:
        """Row masks of all shards, or of `indices` (None: the shard's every row is in the set)."""
        column = self.table.column("mask")
        return (column if indices is None else column.take(pa.array(indices, pa.int64()))).to_pylist()


def pack_rows(rows, n: int) -> bytes:
    """The mask of row numbers `rows` of a file with `n` rows."""
    bits = np.zeros(n, np.uint8)
    bits[np.asarray(rows, np.int64)] = 1
    return np.packbits(bits).tobytes()


@overload
def mask_rows(mask: bytes) -> np.ndarray: ...
@overload
def mask_rows(mask: bytes | None) -> np.ndarray | None: ...
def mask_rows(mask: bytes | None) -> np.ndarray | None:
    """Row numbers a mask selects, ascending (None: all rows)."""
    return None if mask is None else np.flatnonzero(np.unpackbits(np.frombuffer(mask, np.uint8)))


def select_rows(table: pa.Table, mask: bytes | None) -> pa.Table:
    """The rows of a whole shard file's table that its index entry keeps."""
    rows = mask_rows(mask)
    return table if rows is None else table.take(pa.array(rows, pa.int64()))


def write_index(fs: pafs.FileSystem, root: str, index: ShardIndex, name: str = INDEX) -> None:
    """Write the index atomically (temporary name, then move) as `name`."""
    tmp = posixpath.join(root, f".{name}.tmp")
    pq.write_table(index.table, tmp, filesystem=fs, compression="zstd")
    fs.move(tmp, posixpath.join(root, name))


def read_index(fs: pafs.FileSystem, path: str) -> ShardIndex:
    return ShardIndex(pq.read_table(path, filesystem=fs, schema=INDEX_SCHEMA))
