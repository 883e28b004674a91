"""`raysl shards build`: inputs -> parquet shards + manifest, as one Ray Data job.

Pipeline (image bytes never reach the driver and never cross a shuffle):
  references (sources.list_inputs, on the driver; put in a seeded random order, input_order)
  -> read + sha256 + probe + filters + metadata join   (map_batches, one block of refs per task)
     minus the exact duplicates found by the dedup pass (their keys, below)
  -> blocks of `shard_size` rows                        (streaming repartition)
  -> write each block to a staging parquet file         (map_batches; returns one stats row)
Skipped inputs do not travel as rows: each read task folds them into a few "stat rows"
(`_stat` = counter name, `_n` = count) that flow with the images and are summed by the
writers, so every count comes out of the same pass that writes the shards. The driver
then renames the staged files to shard-NNNNN.parquet and writes manifest.json last.

`--append` adds shards to an existing set. Its dedup pass also groups the sha256 of every
row already in the set, read from that one parquet column (column projection: the old
image bytes are never read), under an empty key that sorts first, so a new image with a
hash the set holds is the duplicate. The new shards get names of their own
(shard-v<n>-NNNNN.parquet) and the set's index a new file, index-<n>.parquet: the old
shards and the old index are never rewritten, and manifest.json, replaced last and
atomically, is what switches readers to version n. A crash before that leaves the set as
it was (at most some unlisted files, which the next append overwrites or ignores), and a
run that pinned version n-1 (raysl.data.mixture.pin) keeps reading exactly it.

Exact dedup is a first pass over the same inputs that keeps only (sha256, key) of each
image the filters keep, never its bytes: it groups them by sha256 and returns every key
but the smallest of each group. Only those small columns cross the network in the
shuffle; the image bytes are read again by the pass above and written once. Each
duplicate key comes back tagged with the input reference it was read from, and travels
to the second read inside that reference's row (`_drop`): a read task holds only the
duplicates of its own inputs, the driver all of them once (about 100 bytes each: 5 GB at
50 M duplicates, 5% of 1 B images).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import posixpath
import re
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import cast

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from raysl.data import decode
from raysl.data.buckets import check_buckets
from raysl.data.metadata import load_metadata
from raysl.data.schema import (
    MANIFEST,
    SCHEMA,
    SKIP_REASONS,
    Manifest,
    filesystem_and_path,
    read_manifest,
    shard_paths,
    write_manifest,
)
from raysl.data.shard_index import INDEX, ShardIndex
from raysl.data.sources import Inputs, Item, list_inputs, read_ref
from raysl.errors import UserError
from raysl.progress import bar

STAGING = ".staging"
JOINED = "metadata_joined"  # a stat row counter that is not a skip reason
FAIL_AFTER_ENV = "RAYSL_FAIL_AFTER_SHARDS"  # tests: writers crash once more than this many shards are staged
# what the dedup shuffle groups: the same types from new images and from an appended-to set
HASH_SCHEMA = pa.schema([("sha256", pa.string()), ("key", pa.string()), ("_ref", pa.int64())])
ROW_SCHEMA = SCHEMA.append(pa.field("_stat", pa.string())).append(pa.field("_n", pa.int64()))
_READ_BATCH_ROWS = 256
_READ_BATCH_BYTES = 64 << 20


def _rows_table(rows: list[dict], counts: Counter) -> pa.Table:
    empty = dict(
        key="", image=b"", sha256="", width=0, height=0, format="", source="", license="", attribution="", label=None
    )
    stats = [{**empty, "_stat": name, "_n": n} for name, n in sorted(counts.items()) if n]
    return pa.Table.from_pylist(rows + stats, schema=ROW_SCHEMA)


def _check(item: Item, *, licenses: set[str] | None, min_side: int, max_pixels: int | None):
    """(reason, ImageInfo): reason is "" for an image to keep."""
    if item.reason:
        return item.reason, None
    if licenses is not None and item.license.strip().lower() not in licenses:
        return "filtered", None  # before probing: no need to decode what we drop anyway
    try:
        info = decode.probe(item.data or b"", max_pixels=max_pixels)
    except decode.DecodeError as exc:
        return exc.reason, None
    if min(info.width, info.height) < min_side:
        return "too_small", info
    return "", info


def _read_batch(refs: pa.Table, *, meta: dict, licenses, min_side: int, max_pixels: int | None):
    """Rows of the images in `refs` that pass the filters, plus stat rows counting the rest
    (keys in a `_drop` column, found by the dedup pass, count as duplicates)."""
    drop = set(pc.list_flatten(refs["_drop"]).to_pylist()) if "_drop" in refs.column_names else set()
    limit = PIL.Image.MAX_IMAGE_PIXELS  # None: PIL checks nothing
    if limit is not None and (max_pixels is None or max_pixels > limit):
        # decode._open turns PIL's own bomb warning into "too_large"; let the user's limit rule
        PIL.Image.MAX_IMAGE_PIXELS = max_pixels
    rows: list[dict] = []
    counts: Counter[str] = Counter()
    size = 0
    for ref in refs.to_pylist():
        for item in read_ref(ref):
            extra = meta.get(item.key)
            if extra:
                counts[JOINED] += 1
                for name, value in extra.items():
                    setattr(item, name, value)
            reason, info = _check(item, licenses=licenses, min_side=min_side, max_pixels=max_pixels)
            if not reason and item.key in drop:
                reason = "duplicate"
            if reason:
                counts[reason] += 1
                continue
            rows.append(
                dict(
                    key=item.key,
                    image=item.data,
                    sha256=hashlib.sha256(item.data).hexdigest(),
                    width=info.width,
                    height=info.height,
                    format=info.format,
                    source=item.source,
                    license=item.license,
                    attribution=item.attribution,
                    label=item.label,
                    _stat="",
                    _n=1,
                )
            )
            size += len(item.data)
            if len(rows) >= _READ_BATCH_ROWS or size >= _READ_BATCH_BYTES:
                yield _rows_table(rows, Counter())
                rows, size = [], 0
    yield _rows_table(rows, counts)


def _hashes(refs: pa.Table, **options):
    """The dedup pass's read: (sha256, key, _ref) of every image the filters keep, no bytes;
    `_ref` is the row id of the input reference it came from."""
    for i in range(refs.num_rows):
        for block in _read_batch(refs.slice(i, 1), **options):
            block = block.filter(pc.equal(block["_stat"], "")).select(["sha256", "key"])
            yield block.append_column("_ref", pa.repeat(refs["_ref"][i], block.num_rows)).cast(HASH_SCHEMA)


def _duplicates(group: pa.Table) -> pa.Table:
    """One sha256: every (key, _ref) but the smallest key (the row that is kept)."""
    return group.filter(pc.not_equal(group["key"], pc.min(group["key"]))).select(["key", "_ref"])


def _as_existing(block: pa.Table) -> pa.Table:
    """An existing set's hashes as dedup rows: key "" (sorts before every real key, so the
    row already in the set is the one kept) and no input reference (-1)."""
    n = block.num_rows
    return pa.table(
        {"sha256": block["sha256"], "key": pa.repeat("", n), "_ref": pa.repeat(pa.scalar(-1, pa.int64()), n)},
        schema=HASH_SCHEMA,
    )


def existing_hashes(paths: list[str]) -> ray.data.Dataset:
    """The sha256 of every row of an existing set's shards, read from that column alone."""
    return ray.data.read_parquet(paths, columns=["sha256"]).map_batches(
        _as_existing, batch_size=None, batch_format="pyarrow"
    )


def with_duplicates(
    refs: pa.Table, options: dict, partitions: int, existing: list[str] | None = None
) -> tuple[pa.Table, int]:
    """(`refs` with a `_drop` column: per reference, the keys of its exact duplicates; bytes
    the shuffle moved, from Ray Data's stats). `refs` has a `_ref` column of row ids.
    `existing`: shard files of the set being appended to; an image whose hash one of
    them holds is a duplicate too."""
    hashes = ray.data.from_arrow(_blocks(refs)).map_batches(
        _hashes, batch_size=None, batch_format="pyarrow", fn_kwargs=options
    )
    if existing:
        hashes = hashes.union(existing_hashes(existing))
    dups = hashes.groupby("sha256", num_partitions=partitions).map_groups(_duplicates, batch_format="pyarrow")
    drop: list[list[str]] = [[] for _ in range(refs.num_rows)]
    for t in cast(Iterator[pa.Table], dups.iter_batches(batch_size=None, batch_format="pyarrow")):
        for key, ref in zip(t["key"].to_pylist(), t["_ref"].to_pylist()):
            if ref >= 0:  # an existing row is never a duplicate (its key "" is the smallest)
                drop[ref].append(key)
    return refs.append_column("_drop", pa.array(drop, pa.list_(pa.string()))), shuffled_bytes(dups)


def _blocks(refs: pa.Table) -> list[pa.Table]:
    """One block per reference, except plain files, which go in blocks of up to 64 (files last)."""
    n_big = refs.num_rows - pc.sum(pc.equal(refs["kind"], "file")).as_py()
    return [refs.slice(i, 1) for i in range(n_big)] + [refs.slice(i, 64) for i in range(n_big, refs.num_rows, 64)]


def shuffled_bytes(ds: ray.data.Dataset) -> int:
    """Bytes an executed dataset's hash shuffles moved: the output of their map side, from
    Ray Data's stats (operators named HashShuffleMap(...), in the dataset or its parents)."""
    total: float = 0
    summaries = [ds.get_stats_summary()]
    while summaries:
        summary = summaries.pop()
        summaries += summary.parents
        total += sum(
            op.output_size_bytes.sum
            for op in summary.operators_stats
            if op.operator_name.startswith("HashShuffleMap") and op.output_size_bytes
        )
    return int(total)


def _split(block: pa.Table) -> tuple[pa.Table, Counter]:
    """(image rows, summed stat rows) of a block."""
    is_image = pc.equal(block["_stat"], "")
    stats = block.filter(pc.invert(is_image))
    counts: Counter[str] = Counter()
    for name, n in zip(stats["_stat"].to_pylist(), stats["_n"].to_pylist()):
        counts[name] += n
    return block.filter(is_image), counts


def _write_batch(batch: pa.Table, *, staging: str, fail_after: int) -> pa.Table:
    images, counts = _split(batch)
    images = images.select(SCHEMA.names).cast(SCHEMA)
    name, first, size = "", "", 0
    if images.num_rows:
        fs, root = filesystem_and_path(staging)
        name = f"{uuid.uuid4().hex}.parquet"
        # images are already compressed: compressing them again costs CPU and saves nothing
        pq.write_table(
            images,
            posixpath.join(root, name),
            filesystem=fs,
            compression={c: ("none" if c == "image" else "zstd") for c in SCHEMA.names},
            use_dictionary=[c for c in SCHEMA.names if c != "image"],
        )
        # counted after writing, so whichever writer finishes last sees every staged file
        if fail_after and len(fs.get_file_info(pafs.FileSelector(root))) > fail_after:
            raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: simulated crash after {fail_after} shard(s)")
        first = pc.min(images["key"]).as_py()
        size = fs.get_file_info(posixpath.join(root, name)).size
    names = pc.list_element(pc.split_pattern(images["key"], "/", max_splits=1), 0)  # schema.source_name
    by_source = {d["values"]: d["counts"] for d in pc.value_counts(names).to_pylist()}
    stats = {
        "skipped": dict(counts),
        "licenses": dict(Counter(images["license"].to_pylist())),
        "sources": by_source,
        "bytes": size,
    }
    return pa.table({"file": [name], "rows": [images.num_rows], "first_key": [first], "stats": [json.dumps(stats)]})


def _prepare_out(out: str, overwrite: bool, append: bool = False) -> tuple[pafs.FileSystem, str]:
    fs, root = filesystem_and_path(out)
    try:
        info = fs.get_file_info(root)
        if info.type == pafs.FileType.File:
            raise UserError(f"{out}: is a file; --out must be a folder")
        manifest = posixpath.join(root, MANIFEST)
        if fs.get_file_info(manifest).type != pafs.FileType.NotFound:
            if not overwrite and not append:
                raise UserError(
                    f"{out}: already holds a shard set ({MANIFEST}); pass --append to add to it "
                    "or --overwrite to replace it"
                )
            if overwrite:
                fs.delete_file(manifest)  # from here on a crash leaves no complete-looking set
        fs.create_dir(root, recursive=True)
        staging = posixpath.join(root, STAGING)
        if fs.get_file_info(staging).type != pafs.FileType.NotFound:
            fs.delete_dir(staging)  # left by a crashed build
        fs.create_dir(staging)
        with fs.open_output_stream(posixpath.join(staging, ".probe")) as f:
            f.write(b"ok")
        fs.delete_file(posixpath.join(staging, ".probe"))
    except OSError as exc:
        raise UserError(f"{out}: cannot write shards here ({exc})") from exc
    return fs, root


def _index_versions(fs: pafs.FileSystem, root: str) -> list[int]:
    """Versions of the index files in `root` (index.parquet: 0, index-<n>.parquet: n)."""
    names = [i.base_name for i in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))]
    return [0 if n == INDEX else int(n[6:-8]) for n in names if n == INDEX or re.fullmatch(r"index-\d+\.parquet", n)]


def _finish(fs: pafs.FileSystem, root: str, results: list[dict], manifest: Manifest) -> None:
    """Move staged files to shard-NNNNN.parquet, ordered by first key (staged names are random).
    A set this build replaces goes first, shards and index files: a run that pinned one of
    its index files then stops with one clear line (schema.read_manifest), and its name is
    never reused (the new index's version is above every one that was here)."""
    for old in fs.get_file_info(pafs.FileSelector(root)):
        name = old.base_name
        if name.endswith(".parquet") and (name.startswith("shard-") or name.startswith("index")):
            fs.delete_file(old.path)
    staged = sorted((r for r in results if r["rows"]), key=lambda r: r["first_key"])
    names = [f"shard-{n:05d}.parquet" for n in range(len(staged))]
    for name, r in zip(names, staged):
        fs.move(posixpath.join(root, STAGING, r["file"]), posixpath.join(root, name))
    stats = [json.loads(r["stats"]) for r in staged]
    manifest.shards = ShardIndex.from_columns(
        names, [r["rows"] for r in staged], [s["bytes"] for s in stats], [sorted(s["sources"]) for s in stats]
    )
    fs.delete_dir(posixpath.join(root, STAGING))


def _finish_append(
    fs: pafs.FileSystem, root: str, results: list[dict], added: Manifest, old: Manifest, version: int
) -> Manifest:
    """Move the staged files to names no earlier version uses (shard-v<n>-NNNNN.parquet) and
    return the set's next version: the old index plus the new shards, the counts summed.
    Nothing of the old version is touched; write_manifest then adds index-<n>.parquet and,
    last, replaces manifest.json."""
    version = max(old.index_version + 1, version)
    staged = sorted((r for r in results if r["rows"]), key=lambda r: r["first_key"])
    names = [f"shard-v{version}-{n:05d}.parquet" for n in range(len(staged))]
    for name, r in zip(names, staged):
        fs.move(posixpath.join(root, STAGING, r["file"]), posixpath.join(root, name))
    stats = [json.loads(r["stats"]) for r in staged]
    new = ShardIndex.from_columns(
        names, [r["rows"] for r in staged], [s["bytes"] for s in stats], [sorted(s["sources"]) for s in stats]
    )
    added.shards = new
    added.written = int(new.rows.sum())
    fs.delete_dir(posixpath.join(root, STAGING))

    def total(a: dict, b: dict) -> dict:
        return dict(sorted((Counter(a) + Counter(b)).items()))

    return Manifest(
        shards=ShardIndex(pa.concat_tables([old.shards.table, new.table])),
        written=int(old.written + added.written),
        skipped={reason: old.skipped.get(reason, 0) + added.skipped.get(reason, 0) for reason in SKIP_REASONS},
        licenses=total(old.licenses, added.licenses),
        sources=old.sources + [s for s in added.sources if s not in old.sources],
        source_images=total(old.source_images, added.source_images),
        ignored_files=old.ignored_files + added.ignored_files,
        metadata_unmatched=old.metadata_unmatched + added.metadata_unmatched,
        index_version=version,
    )


def input_order(kinds: list[str], seed: int | None) -> list[int]:
    """The order the inputs are read and written in, as indices into the listed references
    (`kinds`: each one's kind): tars and parquet row groups first (the long reads start
    early), then plain image files, each group in a random order drawn from `seed`.
    Listed inputs are sorted by path, so a folder per class would otherwise become shards
    of one class each, and a training batch, drawn from the few shards of one shuffle
    window, would hold one or two classes (for contrastive methods, negatives of the same
    class). Shuffled, every shard is a sample of the whole set. A tar or a row group moves
    as a whole: its rows keep their order. `seed` None: the listing order (paths sorted)."""
    big = [i for i, k in enumerate(kinds) if k != "file"]
    files = [i for i, k in enumerate(kinds) if k == "file"]
    if seed is None:
        return big + files
    rng = np.random.default_rng(seed)
    return [big[i] for i in rng.permutation(len(big))] + [files[i] for i in rng.permutation(len(files))]


@dataclass
class BuildPlan:
    """Everything `plan_build` checked and found on the driver, before any Ray work."""

    out: str
    inputs: Inputs
    meta: dict
    meta_rows: int
    fs: pafs.FileSystem
    root: str
    shard_size: int
    metadata: str | None
    allow: set[str] | None
    min_side: int
    max_pixels: int | None  # None: no limit
    dedup: bool
    shuffled_bytes: int = 0  # set by run_build: what the dedup shuffle moved (Ray Data's stats)
    existing: Manifest | None = None  # --append: the set as it was
    index_version: int = 0  # of the index this build writes
    order_seed: int | None = 0  # seed of the order inputs are written in; None: listing order (input_order)
    added: Manifest | None = None  # --append, set by run_build: this build's own shards and counts


def plan_build(
    sources: list[str],
    out: str,
    *,
    shard_size: int = 1000,
    metadata: str | None = None,
    licenses: list[str] | None = None,
    min_side: int = 0,
    max_pixels: int | None = PIL.Image.MAX_IMAGE_PIXELS,
    dedup: bool = True,
    overwrite: bool = False,
    append: bool = False,
    order_seed: int | None = 0,
) -> BuildPlan:
    """Check the arguments, list the inputs, read the metadata and make `out` ready, all on
    the driver and without Ray: a missing SRC, a bad metadata row or an unwritable --out is
    a UserError before any Ray job starts (or before Ray itself does, see cli)."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    if not sources:
        raise UserError("give at least one SRC (a folder of images, a .tar or a .parquet)")
    check_buckets({"--out": out, "SRC": sources})
    existing = None
    if append:
        if overwrite:
            raise UserError("--append adds to the shard set in --out and --overwrite replaces it: pass one of them")
        try:
            existing = read_manifest(out)
        except UserError as exc:
            raise UserError(f"--append: {exc}") from exc
    inputs = list_inputs(sources, exclude=out)
    meta, meta_rows = load_metadata(metadata, inputs.roots, inputs.file_keys) if metadata else ({}, 0)
    fs, root = filesystem_and_path(out)
    try:
        version = max(_index_versions(fs, root), default=-1) + 1  # never a name an earlier version had
    except OSError as exc:
        raise UserError(f"{out}: cannot list this folder ({exc})") from exc
    fs, root = _prepare_out(out, overwrite, append)
    allow = {lic.strip().lower() for lic in licenses} if licenses else None
    plan = BuildPlan(out, inputs, meta, meta_rows, fs, root, shard_size, metadata, allow, min_side, max_pixels, dedup)
    plan.existing, plan.index_version, plan.order_seed = existing, version, order_seed
    return plan


def build_shards(sources: list[str], out: str, **options) -> Manifest:
    """Build a shard set in `out` from image folders, WebDataset tars and parquet files.
    Options are those of `plan_build`."""
    return run_build(plan_build(sources, out, **options))


def run_build(plan: BuildPlan) -> Manifest:
    """The Ray Data job of a checked plan; writes the shards and, last, manifest.json."""
    out, inputs, meta, meta_rows, fs, root = plan.out, plan.inputs, plan.meta, plan.meta_rows, plan.fs, plan.root
    shard_size, metadata, allow, dedup = plan.shard_size, plan.metadata, plan.allow, plan.dedup
    min_side, max_pixels = plan.min_side, plan.max_pixels
    staging = f"{out.rstrip('/')}/{STAGING}"

    refs = inputs.refs
    kinds = refs.column("kind").to_pylist()
    refs = refs.take(input_order(kinds, plan.order_seed))
    refs = refs.append_column("_ref", pa.array(range(refs.num_rows), pa.int64()))
    options = dict(meta=meta, licenses=allow, min_side=min_side, max_pixels=max_pixels)
    if dedup:
        partitions = max(
            1,
            min(ray.data.DataContext.get_current().default_hash_shuffle_parallelism, inputs.estimated_images // 20_000),
        )
        old = shard_paths(out, plan.existing) if plan.existing else None
        refs, plan.shuffled_bytes = with_duplicates(refs, options, partitions, old)
    ds: ray.data.Dataset = ray.data.from_arrow(_blocks(refs))
    # Rows reach the shard writers in input_order's order, not in the order tasks finish: the
    # same inputs and seed give the same shards, row for row, on every rebuild.
    ds.context.execution_options.preserve_order = True
    ds = ds.map_batches(
        _read_batch,  # type: ignore[arg-type]  # Ray's type for the function leaves out fn_kwargs
        batch_size=None,
        batch_format="pyarrow",
        fn_kwargs=options,
    )
    ds = ds.repartition(target_num_rows_per_block=shard_size, strict=True)
    ds = ds.map_batches(
        _write_batch,  # type: ignore[arg-type]  # Ray's type for the function leaves out fn_kwargs
        batch_size=shard_size,
        batch_format="pyarrow",
        fn_kwargs=dict(staging=staging, fail_after=int(os.environ.get(FAIL_AFTER_ENV, "0") or 0)),
    )
    manifest = Manifest(sources=list(inputs.roots.values()), ignored_files=inputs.ignored_files)
    results: list[dict] = []
    skipped: Counter[str] = Counter()
    lics: Counter[str] = Counter()
    by_source: Counter[str] = Counter()
    # tars count as an estimated 1,000 images until they are read
    with bar(inputs.estimated_images, "shards build") as progress:
        for r in ds.iter_rows():  # one row per shard written, as the writers finish
            results.append(r)
            stats = json.loads(r["stats"])
            skipped.update(stats["skipped"])
            lics.update(stats["licenses"])
            by_source.update(stats["sources"])
            progress.update(r["rows"] + sum(stats["skipped"].get(reason, 0) for reason in SKIP_REASONS))
            progress.set_postfix(skipped=sum(skipped[reason] for reason in SKIP_REASONS), refresh=False)
    manifest.skipped = {reason: skipped.get(reason, 0) for reason in SKIP_REASONS}
    manifest.licenses = dict(sorted(lics.items()))
    manifest.source_images = dict(sorted(by_source.items()))
    manifest.metadata_unmatched = meta_rows - skipped.get(JOINED, 0) if metadata else 0
    if plan.existing is not None:
        plan.added = manifest
        manifest = _finish_append(fs, root, results, manifest, plan.existing, plan.index_version)
    else:
        _finish(fs, root, results, manifest)
        manifest.written = manifest.rows
        manifest.index_version = plan.index_version
    write_manifest(out, manifest)  # last: only now is the shard set (or its new version) complete
    return manifest


def format_summary(manifest: Manifest, plan: BuildPlan | None = None) -> str:
    if plan is not None and plan.added is not None:  # --append: this build's counts, then the set's
        added = plan.added
        lines = [
            f"appended {added.written:,} images in {len(added.shards)} new shard(s); the set now has "
            f"{manifest.rows:,} images in {len(manifest.shards)} shard(s) (index version {manifest.index_version})"
        ]
        return "\n".join(lines + format_summary(added, None).splitlines()[1:] + _dedup_line(plan))
    skipped = sum(manifest.skipped.values())
    lines = [f"wrote {manifest.written:,} images in {len(manifest.shards)} shard(s)"]
    reasons = ", ".join(f"{r} {n:,}" for r, n in manifest.skipped.items() if n)
    lines.append(f"skipped {skipped:,}" + (f" ({reasons})" if reasons else ""))
    if manifest.ignored_files:
        lines.append(f"ignored {manifest.ignored_files:,} file(s) that are not images")
    if manifest.metadata_unmatched:
        lines.append(f"metadata: {manifest.metadata_unmatched:,} row(s) matched no input")
    if manifest.licenses:
        lines.append("licenses: " + ", ".join(f"{lic or '(none)'} {n:,}" for lic, n in manifest.licenses.items()))
    lines.append("sources: " + ", ".join(manifest.sources))
    return "\n".join(lines + _dedup_line(plan))


def _dedup_line(plan: BuildPlan | None) -> list[str]:
    if plan is None or not plan.dedup:
        return []
    return [f"dedup shuffled {plan.shuffled_bytes:,} bytes (sha256 and key of each image, no image bytes)"]


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    from raysl.paths import resolve_path

    p.add_argument("src", nargs="+", type=resolve_path, help="image folders, .tar files or .parquet files")
    p.add_argument("--out", type=resolve_path, required=True, help="output shard directory")
    p.add_argument("--shard-size", type=int, default=1000, help="rows per shard (default 1000)")
    p.add_argument(
        "--metadata", type=resolve_path, help="CSV/JSONL with path or key plus license, attribution, source, label"
    )
    p.add_argument("--license", type=_csv_list, help="keep only images whose license is in this comma list")
    p.add_argument("--min-side", type=int, default=0, help="skip images whose shorter side is smaller")
    p.add_argument("--max-pixels", type=int, default=89_478_485, help="skip images with more pixels (bomb guard)")
    p.add_argument("--no-dedup", action="store_true", help="keep exact duplicates (sha256)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the random order images are written in, so every shard mixes the whole input (default 0)",
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="write images in input order (paths sorted) instead: a folder per class then gives one-class shards",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing shard set in --out")
    p.add_argument(
        "--append",
        action="store_true",
        help="add shards to the set in --out (dedup against it by hash); runs reading it keep their version",
    )


def run_from_args(args: argparse.Namespace) -> None:
    from raysl.runtime import init_ray

    # SRC, --metadata and --out are checked before Ray starts: a mistake costs no cluster start-up
    plan = plan_build(
        args.src,
        args.out,
        shard_size=args.shard_size,
        metadata=args.metadata,
        licenses=args.license,
        min_side=args.min_side,
        max_pixels=args.max_pixels,
        dedup=not args.no_dedup,
        order_seed=None if args.keep_order else args.seed,
        overwrite=args.overwrite,
        append=args.append,
    )
    print(init_ray(args.address), file=sys.stderr)
    manifest = run_build(plan)
    print(format_summary(manifest, plan))
