"""Schema version 1, where manifest.json listed every shard: `raysl shards migrate DIR`
turns such a set into the current format, and `raysl bench plan` measures it as its
baseline (write, read and plan exactly as raysl did before the index)."""

from __future__ import annotations

import argparse
import posixpath
from dataclasses import dataclass, field

import numpy as np
import pyarrow.fs as pafs

from raysl.data.schema import (
    MANIFEST,
    SCHEMA_VERSION,
    Manifest,
    filesystem_and_path,
    read_manifest_json,
    write_json_atomically,
    write_manifest,
)
from raysl.data.shard_index import ShardIndex
from raysl.errors import UserError


@dataclass
class ManifestV1:
    shards: list[dict] = field(default_factory=list)  # [{"file": name, "rows": n}]
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    licenses: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    ignored_files: int = 0
    metadata_unmatched: int = 0
    schema_version: int = 1


def write_v1(directory: str, manifest: ManifestV1) -> None:
    write_json_atomically(*filesystem_and_path(directory), manifest.__dict__)


def read_v1(directory: str) -> ManifestV1:
    _, _, path, raw = read_manifest_json(directory)
    if raw.get("schema_version") != 1 or not isinstance(raw.get("shards"), list):
        raise UserError(
            f"{path}: schema version {raw.get('schema_version')!r}, not an old (version 1) shard set; "
            "nothing to migrate"
        )
    return ManifestV1(**{k: v for k, v in raw.items() if k in ManifestV1.__dataclass_fields__})


def steps_per_epoch_v1(manifest: ManifestV1, *, batch_size: int, seed: int, epoch: int, world_size: int) -> int:
    """The planning raysl did with version 1: one whole permutation per worker rank."""
    n = len(manifest.shards)
    shares = []
    for rank in range(world_size):
        order = np.random.default_rng([seed, epoch]).permutation(n)
        shares.append(sum(manifest.shards[int(i)]["rows"] for i in order[rank::world_size]))
    return min(shares) // batch_size


def migrate(directory: str) -> Manifest:
    """Rewrite an old set's shard list as the index and manifest.json as the new summary,
    each atomically, index first: a crash midway leaves the old manifest (and so the old,
    complete set) in place. Shard sizes come from one listing of the directory; which
    SRC names each shard holds is not in the old manifest, so those stay empty."""
    old = read_v1(directory)
    fs, root = filesystem_and_path(directory)
    sizes = {info.base_name: info.size for info in fs.get_file_info(pafs.FileSelector(root))}
    files = [s["file"] for s in old.shards]
    missing = [f for f in files if f not in sizes]
    if missing:
        raise UserError(
            f"{posixpath.join(root, missing[0])}: listed in {MANIFEST} but not there "
            f"({len(missing)} shard file(s) missing); rebuild the shard set"
        )
    index = ShardIndex.from_columns(files, [s["rows"] for s in old.shards], [sizes[f] for f in files])
    manifest = Manifest(
        shards=index,
        written=old.written,
        skipped=old.skipped,
        licenses=old.licenses,
        sources=old.sources,
        ignored_files=old.ignored_files,
        metadata_unmatched=old.metadata_unmatched,
        schema_version=SCHEMA_VERSION,
    )
    write_manifest(directory, manifest)
    return manifest


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("dir", type=resolve_path, help="the shard set to rewrite in place")


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.data.buckets import check_bucket

    check_bucket(args.dir, "raysl shards migrate")
    m = migrate(args.dir)
    print(f"migrated {args.dir}: {len(m.shards):,} shard(s), {m.rows:,} images; the shard list is now in its index")
