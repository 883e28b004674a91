"""A small shard set kept in Ray's object store for the whole run.

A set of a few thousand images is read from its shards again every epoch, and on a
bucket that is a request per shard per epoch. When its files fit `data.cache_share` of
the cluster's object store, one process reads each shard once (the columns the stream
needs, whole files: a selection's masks apply as they are read) and puts it in the
store; the read tasks then take a shard from there (zero-copy on the same node) instead
of from storage. The first worker owns the tables and passes their refs to the others;
a node's store holds one copy (the owner's node from the start, another node from its
first read), freed once the run's workers are gone.
"""

from __future__ import annotations

import ray

from raysl.data.schema import Manifest, read_shard, shard_paths


def set_bytes(manifest: Manifest) -> int:
    """The set's shard files' size on storage, from its index."""
    return int(manifest.shards.table.column("bytes").to_numpy().sum())


def fits(manifest: Manifest, share: float) -> bool:
    """Whether the set's files take at most `share` of the cluster's object store."""
    store = ray.cluster_resources().get("object_store_memory", 0)
    return share > 0 and 0 < set_bytes(manifest) <= share * store


def put_set(shards: str, manifest: Manifest, columns: list[str]) -> dict[str, ray.ObjectRef]:
    """Each shard file's `columns` (whole file: its mask applies as it is read), put in the
    object store: path -> ref."""
    return {path: ray.put(read_shard(path, None, columns)) for path in shard_paths(shards, manifest)}
