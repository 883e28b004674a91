"""Shard format: the parquet schema and the manifest that makes a shard set complete.

A shard directory is complete only once `manifest.json` exists; it is written last and
atomically (write to a temporary name, then rename), after the shard index
(`index.parquet`, see shard_index) it names, and readers read only the shard files the
index lists. A build that crashes midway therefore never leaves anything a reader
would take as complete. manifest.json holds only summary counts, so it stays small
however many shards the set has. `raysl shards build --append` writes each new version of
the list as a new file (index-<n>.parquet, see build) and never rewrites an old one, so a
run that pinned one (read_manifest's `index`) keeps reading exactly its shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.fs as pafs

from raysl.data.shard_index import INDEX, ShardIndex, read_index, select_rows, write_index
from raysl.errors import UserError

SCHEMA_VERSION = 2  # 1: every shard listed in manifest.json (see legacy)
MANIFEST = "manifest.json"

SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("sha256", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("format", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("license", pa.string(), nullable=False),
        pa.field("attribution", pa.string(), nullable=False),
        pa.field("label", pa.int64(), nullable=True),
    ]
)

# Why an input did not become a row. Every skipped input is counted under one of these.
SKIP_REASONS = (
    "empty",  # zero bytes
    "not_image",  # no image header we recognise
    "unsupported_format",  # an image, but not jpeg/png/webp/bmp/tiff/gif
    "corrupt",  # header parses, pixels do not decode (truncated, damaged)
    "too_small",  # shorter side below --min-side
    "too_large",  # more pixels than --max-pixels (decompression-bomb guard)
    "duplicate",  # same sha256 as a row already kept
    "filtered",  # license not in the --license allow-list
    "unreadable",  # the file itself could not be read (permissions, I/O)
)


@dataclass
class Manifest:
    shards: ShardIndex = field(default_factory=ShardIndex)  # stored in INDEX, not in manifest.json
    written: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    licenses: dict[str, int] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)
    source_images: dict[str, int] = field(default_factory=dict)  # images per SRC name (first part of the key)
    ignored_files: int = 0  # files in SRC folders that are not images (the builder lists them)
    metadata_unmatched: int = 0  # --metadata rows that named no input
    curation: dict = field(default_factory=dict)  # a selection made by raysl curate: its steps and counts
    schema_version: int = SCHEMA_VERSION
    # 0: the index is INDEX; each `shards build --append` writes a new, never rewritten
    # index-<n>.parquet, so a run that pinned an older one keeps reading exactly its shards
    index_version: int = 0

    @property
    def index_file(self) -> str:
        return index_name(self.index_version)

    @property
    def rows(self) -> int:
        return int(self.shards.rows.sum())

    def summary(self) -> dict:
        """What manifest.json holds: everything but the shard list, plus its size and where it is."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "shards"}
        return fields | {"index": self.index_file, "shards": len(self.shards), "rows": self.rows}


def index_name(version: int) -> str:
    """The index file of index version `version` (0: the one a fresh build writes)."""
    return INDEX if version == 0 else f"index-{version}.parquet"


def filesystem_and_path(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem for a local path or any URI pyarrow knows (s3://, gs://, ...)."""
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises several types for bad URIs
        raise UserError(f"{uri}: cannot open this storage URI ({exc})") from exc


def write_manifest(directory: str, manifest: Manifest) -> None:
    """The index first, then manifest.json, each atomically: the set is complete only once
    manifest.json is there, and then its index is too."""
    fs, root = filesystem_and_path(directory)
    write_index(fs, root, manifest.shards, manifest.index_file)
    write_json_atomically(fs, root, manifest.summary())


def write_json_atomically(fs: pafs.FileSystem, root: str, raw: dict) -> None:
    tmp = posixpath.join(root, f".{MANIFEST}.tmp")
    with fs.open_output_stream(tmp) as f:
        f.write(json.dumps(raw, indent=2, sort_keys=True).encode())
    fs.move(tmp, posixpath.join(root, MANIFEST))


def write_shard_set(directory: str, rows: list[dict], *, shard_size: int, sources: list[str]) -> Manifest:
    """A shard set of rows made in-process (benchmarks, tests), written straight with
    pyarrow: no decoding, filtering or dedup, unlike `raysl shards build`. Each row has
    every SCHEMA column but `sha256`, which is computed here. A local directory."""
    import hashlib
    from collections import Counter

    import pyarrow.parquet as pq

    os.makedirs(directory, exist_ok=True)
    files, counts, sizes, names = [], [], [], []
    for n, start in enumerate(range(0, len(rows), shard_size)):
        chunk = [dict(r, sha256=hashlib.sha256(r["image"]).hexdigest()) for r in rows[start : start + shard_size]]
        name = f"shard-{n:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA), os.path.join(directory, name))
        files.append(name)
        counts.append(len(chunk))
        sizes.append(os.path.getsize(os.path.join(directory, name)))
        names.append(sorted({source_name(r["key"]) for r in chunk}))
    manifest = Manifest(shards=ShardIndex.from_columns(files, counts, sizes, names), sources=sources)
    manifest.written = len(rows)
    manifest.licenses = dict(Counter(r["license"] for r in rows))
    manifest.source_images = dict(Counter(source_name(r["key"]) for r in rows))
    write_manifest(directory, manifest)
    return manifest


def read_manifest_json(directory: str) -> tuple[pafs.FileSystem, str, str, dict]:
    """(filesystem, root, path of manifest.json, its parsed JSON): any schema version."""
    fs, root = filesystem_and_path(directory)
    path = posixpath.join(root, MANIFEST)
    try:
        with fs.open_input_stream(path) as f:
            raw = json.loads(f.read())
    except FileNotFoundError as exc:
        raise UserError(
            f"{directory}: no {MANIFEST} here, so this is not a complete shard set "
            "(build one with `raysl shards build SRC --out DIR`)"
        ) from exc
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: manifest is not valid JSON ({exc})") from exc
    return fs, root, path, raw


def read_manifest(directory: str, index: str | None = None) -> Manifest:
    """The set's summary and its shard index: the index manifest.json names, or the one
    named `index` (an index file of this set that a run pinned when it started)."""
    fs, root, path, raw = read_manifest_json(directory)
    version = raw.get("schema_version")
    if version == 1:
        raise UserError(
            f"{path}: shard set in the old format (schema version 1, every shard listed in {MANIFEST}); "
            f"rebuild it (`raysl shards build SRC --out DIR --overwrite`) or run `raysl shards migrate {directory}`"
        )
    if version != SCHEMA_VERSION:
        raise UserError(
            f"{path}: shard schema version {version!r}, this raysl reads {SCHEMA_VERSION}; "
            "rebuild the shards with this version"
        )
    pinned = index is not None and index != raw.get("index", INDEX)
    if index is not None and (posixpath.basename(index) != index or not index.endswith(".parquet")):
        raise UserError(f"{directory}: {index!r} is not an index file name of a shard set")
    name: str = index if index is not None and pinned else raw.get("index", INDEX)
    index_path = posixpath.join(root, name)
    try:
        shards = read_index(fs, index_path)
    except FileNotFoundError as exc:
        if pinned:
            raise UserError(
                f"{index_path}: the shard index this run started with is gone (the set was rebuilt, not "
                "appended to); start a new run (train.name=NEW) to read the set as it is now"
            ) from exc
        raise UserError(f"{index_path}: the shard index {MANIFEST} names is missing; rebuild the shard set") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise UserError(f"{index_path}: cannot read the shard index ({exc}); rebuild the shard set") from exc
    if not pinned and len(shards) != raw.get("shards"):
        raise UserError(
            f"{index_path}: lists {len(shards)} shard(s), {MANIFEST} says {raw.get('shards')}; rebuild the shard set"
        )
    known = {f for f in Manifest.__dataclass_fields__} - {"shards"}
    manifest = Manifest(shards=shards, **{k: v for k, v in raw.items() if k in known})
    manifest.index_version = index_version(name)  # pinned: the summary counts are the set's now
    if manifest.curation.get(SOURCE_FINGERPRINT):
        check_selection_source(directory, manifest)
    return manifest


# A selection's manifest records this fingerprint of the source shards it points into.
SOURCE_FINGERPRINT = "source_fingerprint"


def source_fingerprint(source: str, manifest: Manifest, paths: list[str]) -> str:
    """sha256 over each of `paths`' entry in the index of the set `source` (file, rows,
    bytes, row mask): a selection's row masks stay valid while it is unchanged. Appends
    never rewrite an old shard, so they keep it; a rebuild of the source changes it."""
    entries = dict(
        zip(shard_paths(source, manifest), manifest.shards.table.select(["rows", "bytes", "mask"]).to_pylist())
    )
    digest = hashlib.sha256()
    for path in paths:
        entry = entries.get(path)
        digest.update(json.dumps([path, entry and [entry["rows"], entry["bytes"]]]).encode())
        digest.update((entry and entry["mask"]) or b"")
    return digest.hexdigest()


def check_selection_source(directory: str, manifest: Manifest) -> None:
    """A UserError when the set a selection was made from changed since: its row masks
    would then pick other images than the ones curated."""
    source = manifest.curation["source"]
    try:
        now = source_fingerprint(source, read_manifest(source), manifest.shards.files())
    except UserError as exc:
        raise UserError(f"{directory}: a selection of {source}, which cannot be read now: {exc}") from exc
    if now != manifest.curation[SOURCE_FINGERPRINT]:
        raise UserError(
            f"{directory}: a selection of {source}, whose shard files changed since it was made (rebuilt?), so its "
            "row masks would pick other images; curate the set again (raysl curate embed, then the steps)"
        )


def index_version(name: str) -> int:
    """The version of an index file name (`index_name`'s inverse)."""
    if name == INDEX:
        return 0
    number = name.removeprefix("index-").removesuffix(".parquet")
    if not number.isdigit():
        raise UserError(f"{name!r} is not an index file name of a shard set (index.parquet or index-<n>.parquet)")
    return int(number)


def source_name(key: str) -> str:
    """The SRC name a row came from: keys start with it (`photos/cat.jpg`, `web.tar/0`)."""
    return key.split("/", 1)[0]


def shard_paths(directory: str, manifest: Manifest, indices=None) -> list[str]:
    """Full paths (or URIs) of the shard files a manifest lists, in manifest order, or of
    the shards at `indices` (in that order). A selection (raysl curate) names files of
    other sets by absolute path or URI; those are returned as they are."""
    base = directory.rstrip("/")
    return [name if _absolute(name) else f"{base}/{name}" for name in manifest.shards.files(indices)]


def shard_files(directory: str, manifest: Manifest | None = None) -> list[tuple[str, bytes | None]]:
    """(path, row mask) of each shard file of a set, in manifest order; the mask picks the
    rows a selection keeps (None: every row of the file is in the set)."""
    manifest = manifest or read_manifest(directory)
    return list(zip(shard_paths(directory, manifest), manifest.shards.masks()))


def read_shard(path: str, mask: bytes | None, columns: list[str]) -> pa.Table:
    """The set's rows of one shard file (`shard_files`), only `columns`."""
    import pyarrow.parquet as pq

    fs, local = filesystem_and_path(path)
    return select_rows(pq.read_table(local, columns=columns, filesystem=fs), mask)


def _absolute(name: str) -> bool:
    return name.startswith("/") or "://" in name
