"""A curated set is a selection: a shard set whose index points at the kept rows of the
original shard files (their absolute paths plus a row mask, see data.shard_index), so no
image byte is rewritten. Beside its manifest it keeps `lineage.parquet`, one record per
embedded image of the source set: key, shard, row, decision (keep/drop), reason
(duplicate, contaminated, balance), duplicate_of (the key it copies), similarity (to that
key, or to the nearest eval image), dedup cluster and balance cluster ids per level.
Steps chain: `--from SEL` starts from an earlier selection's lineage (same embeddings) and
only its kept images are candidates; the curation record in manifest.json lists every step.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raysl.curate import embeddings
from raysl.errors import UserError

LINEAGE = "lineage.parquet"


def plan_out(out: str, overwrite: bool) -> None:
    from raysl.data.schema import MANIFEST

    if os.path.exists(os.path.join(out, MANIFEST)) and not overwrite:
        raise UserError(f"{out}: already holds a shard set ({MANIFEST}); pass --overwrite to replace it")


def prior(sel: str | None, emb: str) -> tuple[dict, pa.Table | None]:
    """(curation record, lineage) of an earlier selection `--from SEL`, checked against EMB."""
    if not sel:
        return {}, None
    from raysl.data.schema import read_manifest

    curation = read_manifest(sel).curation
    if not curation:
        raise UserError(f"--from {sel}: not a selection made by raysl curate (its manifest has no curation record)")
    if curation.get("emb") != os.path.abspath(emb):
        raise UserError(f"--from {sel}: was made from embeddings {curation.get('emb')}, not {os.path.abspath(emb)}")
    return curation, pq.read_table(os.path.join(sel, LINEAGE))


def candidates_count(emb: str, sel: str | None) -> int:
    """Images a step would consider, from parquet footers and the prior lineage only."""
    meta = embeddings.read_meta(emb)
    if sel:
        _, lineage = prior(sel, emb)
        assert lineage is not None  # sel is given
        return int(np.sum(np.asarray(lineage.column("decision").to_pylist()) == "keep"))
    return sum(
        pq.read_metadata(os.path.join(emb, embeddings.part_name(s))).num_rows
        for s in range(meta["shards"])
        if os.path.exists(os.path.join(emb, embeddings.part_name(s)))
    )


class State:
    """The embeddings and the lineage so far; `candidates`: rows still kept."""

    def __init__(self, emb: str, model: str | None, sel: str | None):
        self.emb = os.path.abspath(emb)
        self.meta, self.table, self.x = embeddings.load(emb, model)
        self.curation, lineage = prior(sel, emb)
        n = self.table.num_rows
        self.keys = self.table.column("key").to_pylist()
        self.decision = np.array(["keep"] * n, dtype=object)
        self.reason = np.array([""] * n, dtype=object)
        self.duplicate_of = np.array([None] * n, dtype=object)
        self.similarity = np.full(n, np.nan, np.float32)
        self.dedup_cluster = np.full(n, -1, np.int64)
        self.clusters: list = [[] for _ in range(n)]
        if lineage is not None:
            if lineage.num_rows != n or lineage.column("key").to_pylist() != self.keys:
                raise UserError(f"--from: its {LINEAGE} does not list the images of {emb} in order; recurate from EMB")
            self.decision = np.array(lineage.column("decision").to_pylist(), dtype=object)
            self.reason = np.array(lineage.column("reason").to_pylist(), dtype=object)
            self.duplicate_of = np.array(lineage.column("duplicate_of").to_pylist(), dtype=object)
            self.similarity = lineage.column("similarity").to_numpy(zero_copy_only=False).astype(np.float32)
            self.dedup_cluster = lineage.column("dedup_cluster").to_numpy()
            self.clusters = lineage.column("clusters").to_pylist()
        self.steps = list(self.curation.get("steps", []))

    @property
    def candidates(self) -> np.ndarray:
        return np.flatnonzero(self.decision == "keep")

    def drop(self, rows: np.ndarray, reason: str) -> None:
        self.decision[rows] = "drop"
        self.reason[rows] = reason

    def lineage(self) -> pa.Table:
        return pa.table(
            {
                "key": pa.array(self.keys, pa.string()),
                "shard": self.table.column("shard"),
                "row": self.table.column("row"),
                "decision": pa.array(self.decision.tolist(), pa.string()),
                "reason": pa.array(self.reason.tolist(), pa.string()),
                "duplicate_of": pa.array(self.duplicate_of.tolist(), pa.string()),
                "similarity": pa.array(self.similarity, pa.float32()),
                "dedup_cluster": pa.array(self.dedup_cluster, pa.int64()),
                "clusters": pa.array(self.clusters, pa.list_(pa.int64())),
            }
        )

    def write(self, out: str, step: dict) -> dict:
        """The selection shard set in `out`: lineage, then index and manifest.json (last)."""
        from raysl.data.schema import (
            SOURCE_FINGERPRINT,
            Manifest,
            read_manifest,
            shard_paths,
            source_fingerprint,
            write_manifest,
        )
        from raysl.data.shard_index import ShardIndex, pack_rows

        source = self.meta["source"]
        manifest = read_manifest(source)
        paths = shard_paths(source, manifest)
        sources = manifest.shards.table.column("sources").to_pylist()
        keep = self.candidates
        shard = self.table.column("shard").to_numpy()[keep]
        row = self.table.column("row").to_numpy()[keep]
        files, counts, masks, srcs = [], [], [], []
        for s in np.unique(shard):
            rows = np.sort(row[shard == s])
            files.append(paths[s])
            counts.append(len(rows))
            masks.append(pack_rows(rows, int(rows[-1]) + 1))
            srcs.append(sources[s])
        self.steps.append(step)
        counts_by = {"embedded": len(self.keys), "kept": int(len(keep))}
        for reason in ("duplicate", "contaminated", "balance"):
            counts_by[f"dropped_{reason}"] = int(np.sum(self.reason == reason))
        curation = {
            "source": source,
            SOURCE_FINGERPRINT: source_fingerprint(source, manifest, files),  # checked whenever the set is read
            "emb": self.emb,
            "model": self.meta["model"],
            "lineage": LINEAGE,
            "steps": self.steps,
            "counts": counts_by,
        }
        os.makedirs(out, exist_ok=True)
        pq.write_table(self.lineage(), os.path.join(out, f".{LINEAGE}.tmp"))
        os.replace(os.path.join(out, f".{LINEAGE}.tmp"), os.path.join(out, LINEAGE))
        result = Manifest(
            shards=ShardIndex.from_columns(files, counts, None, srcs, masks),
            sources=list(manifest.sources),
            curation=curation,
        )
        result.written = int(len(keep))
        write_manifest(out, result)
        return curation
