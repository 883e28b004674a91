"""A curated set is a selection: a shard set whose index points at the kept rows of the
original shard files (their absolute paths plus a row mask, see data.shard_index), so no
image byte is rewritten. Beside its manifest it keeps `lineage.parquet`, a folder of parquet
parts, one per embedding part, with one record per embedded image of the source set: key,
shard, row, decision (keep/drop), reason (duplicate, contaminated, balance), duplicate_of
(the key it copies), similarity (to that key, or to the nearest eval image), dedup cluster
and balance cluster ids per level (pyarrow reads the folder as one table).
Steps chain: `--from SEL` starts from an earlier selection's lineage (same embeddings) and
only its kept images are candidates; the curation record in manifest.json lists every step.
Each lineage part is written by one task, and the selection's index is made from their
summaries (counts and the kept rows' mask), never from all records at once.
"""

from __future__ import annotations

import base64
import os
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raysl.curate import embeddings, parts
from raysl.errors import UserError

LINEAGE = "lineage.parquet"
REASONS = ("duplicate", "contaminated", "balance")
LINEAGE_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.int32()),
        ("row", pa.int64()),
        ("decision", pa.string()),
        ("reason", pa.string()),
        ("duplicate_of", pa.string()),
        ("similarity", pa.float32()),
        ("dedup_cluster", pa.int64()),
        ("clusters", pa.list_(pa.int64())),
    ]
)


def plan_out(out: str, overwrite: bool) -> None:
    from raysl.data.schema import MANIFEST

    if parts.exists(parts.join(out, MANIFEST)) and not overwrite:
        raise UserError(f"{out}: already holds a shard set ({MANIFEST}); pass --overwrite to replace it")


def prior(sel: str | None, emb: str) -> dict:
    """The curation record of an earlier selection `--from SEL`, checked against EMB."""
    if not sel:
        return {}
    from raysl.data.schema import read_manifest

    curation = read_manifest(sel).curation
    if not curation:
        raise UserError(f"--from {sel}: not a selection made by raysl curate (its manifest has no curation record)")
    if curation.get("emb") != _absolute(emb):
        raise UserError(f"--from {sel}: was made from embeddings {curation.get('emb')}, not {_absolute(emb)}")
    return curation


def _absolute(uri: str) -> str:
    return uri.rstrip("/") if "://" in uri else os.path.abspath(uri)


def candidates_count(emb: str, sel: str | None) -> int:
    """Images a step would consider, from parquet footers or the prior selection's counts."""
    if sel:
        return int(prior(sel, emb)["counts"]["kept"])
    meta = embeddings.read_meta(emb)
    total = 0
    for uri in embeddings.part_uris(emb, meta):
        fs, path = parts.fs_path(uri)
        with fs.open_input_file(path) as f:
            total += pq.read_metadata(f).num_rows
    return total


def prior_part(sel: str | None, shard: int) -> str | None:
    """Where an earlier selection keeps the lineage of embedding part `shard`."""
    return parts.join(sel, LINEAGE, parts.part_name(shard)) if sel else None


def start(ids: pa.Table, prior_uri: str | None) -> dict:
    """The lineage columns of one embedding part (`ids`: its key, shard, row), as the earlier
    selection left them, or all kept."""
    n = ids.num_rows
    cols = {
        "key": ids.column("key"),
        "shard": ids.column("shard").cast(pa.int32()),
        "row": ids.column("row"),
        "decision": np.array(["keep"] * n, dtype=object),
        "reason": np.array([""] * n, dtype=object),
        "duplicate_of": np.array([None] * n, dtype=object),
        "similarity": np.full(n, np.nan, np.float32),
        "dedup_cluster": np.full(n, -1, np.int64),
        "clusters": [[] for _ in range(n)],
    }
    if prior_uri is None:
        return cols
    fs, path = parts.fs_path(prior_uri)
    try:
        old = pq.read_table(path, filesystem=fs)
    except FileNotFoundError:
        whole = posixpath.dirname(path)  # a selection of an earlier raysl: one lineage file
        if fs.get_file_info(whole).type != pafs.FileType.File:
            raise UserError(f"{prior_uri}: missing; --from must be a complete selection of these embeddings") from None
        shard = ids.column("shard")[0].as_py() if n else -1
        old = pq.read_table(whole, filesystem=fs, filters=[("shard", "=", shard)])
    if not old.column("key").equals(ids.column("key")):
        raise UserError(f"{prior_uri}: does not list the images of its embedding part in order; recurate from EMB")
    for name in ("decision", "reason", "duplicate_of"):
        cols[name] = np.array(old.column(name).to_pylist(), dtype=object)
    cols["similarity"] = old.column("similarity").to_numpy(zero_copy_only=False).astype(np.float32)
    cols["dedup_cluster"] = old.column("dedup_cluster").to_numpy().copy()
    cols["clusters"] = old.column("clusters").to_pylist()
    return cols


def candidates(cols: dict) -> np.ndarray:
    """Positions still kept."""
    return np.flatnonzero(cols["decision"] == "keep")


def drop(cols: dict, rows: np.ndarray, reason: str) -> None:
    cols["decision"][rows] = "drop"
    cols["reason"][rows] = reason


def finish(cols: dict, uri: str, shard: int, extra: dict | None = None) -> dict:
    """Write one lineage part; its summary: counts by reason, and the mask of the rows it
    keeps in shard `shard`'s file."""
    from raysl.data.shard_index import pack_rows

    table = pa.table(
        {
            **{k: cols[k] for k in ("key", "shard", "row")},
            **{k: pa.array(cols[k].tolist(), pa.string()) for k in ("decision", "reason", "duplicate_of")},
            "similarity": pa.array(cols["similarity"], pa.float32()),
            "dedup_cluster": pa.array(cols["dedup_cluster"], pa.int64()),
            "clusters": pa.array(cols["clusters"], pa.list_(pa.int64())),
        },
        schema=LINEAGE_SCHEMA,
    )
    keep = candidates(cols)
    rows = np.sort(cols["row"].to_numpy()[keep])
    summary = {
        "shard": shard,
        "images": table.num_rows,
        "kept": int(len(keep)),
        "dropped": {r: int(np.sum(cols["reason"] == r)) for r in REASONS},
        "mask": base64.b64encode(pack_rows(rows, int(rows[-1]) + 1)).decode() if len(rows) else "",
    }
    return parts.write(table, uri, summary | (extra or {}))


def write(out: str, emb: str, meta: dict, curation: dict, step: dict, summaries: list[dict]) -> dict:
    """The selection shard set in `out` from its lineage parts' summaries: index and
    manifest.json (last); then the step's working folder goes."""
    from raysl.data.schema import (
        SOURCE_FINGERPRINT,
        Manifest,
        read_manifest,
        shard_paths,
        source_fingerprint,
        write_manifest,
    )
    from raysl.data.shard_index import ShardIndex

    source = meta["source"]
    manifest = read_manifest(source)
    paths = shard_paths(source, manifest)
    sources = manifest.shards.table.column("sources").to_pylist()
    files, counts, masks, srcs = [], [], [], []
    for s in sorted(summaries, key=lambda s: s["shard"]):
        if s["kept"]:
            files.append(paths[s["shard"]])
            counts.append(s["kept"])
            masks.append(base64.b64decode(s["mask"]))
            srcs.append(sources[s["shard"]])
    counts_by = {"embedded": sum(s["images"] for s in summaries), "kept": sum(s["kept"] for s in summaries)}
    for reason in REASONS:
        counts_by[f"dropped_{reason}"] = sum(s["dropped"][reason] for s in summaries)
    record = {
        "source": source,
        SOURCE_FINGERPRINT: source_fingerprint(source, manifest, files),  # checked whenever the set is read
        "emb": _absolute(emb),
        "model": meta["model"],
        "lineage": LINEAGE,
        "steps": [*curation.get("steps", []), step],
        "counts": counts_by,
    }
    result = Manifest(
        shards=ShardIndex.from_columns(files, counts, None, srcs, masks),
        sources=list(manifest.sources),
        curation=record,
    )
    result.written = counts_by["kept"]
    write_manifest(out, result)
    parts.remove(parts.join(out, parts.WORK))
    return record
