"""The compact manifest: summary counts in manifest.json, the shard list in index.parquet,
old (version 1) sets refused with a way out, and migration."""

import json
import os

import pyarrow.parquet as pq
import pytest
from shardfactory import as_v1

from raysl.data import legacy, reader, schema
from raysl.data.schema import MANIFEST, read_manifest, shard_paths
from raysl.data.shard_index import INDEX, INDEX_SCHEMA, read_index
from raysl.errors import UserError


def test_manifest_holds_counts_and_the_index_holds_the_shards(small_shards):
    raw = json.load(open(os.path.join(small_shards, MANIFEST)))
    assert raw["schema_version"] == schema.SCHEMA_VERSION == 2
    assert (raw["shards"], raw["rows"], raw["written"], raw["index"]) == (6, 40, 40, INDEX)
    assert raw["source_images"] == {"digits": 40} and raw["licenses"] == {"cc0-1.0": 40}
    index = pq.read_table(os.path.join(small_shards, INDEX))
    assert index.schema == INDEX_SCHEMA
    files = sorted(f for f in os.listdir(small_shards) if f.startswith("shard-"))
    assert index["file"].to_pylist() == files
    assert index["rows"].to_pylist() == [7, 7, 7, 7, 7, 5]
    assert index["bytes"].to_pylist() == [os.path.getsize(os.path.join(small_shards, f)) for f in files]
    assert index["sources"].to_pylist() == [["digits"]] * 6
    m = read_manifest(small_shards)
    assert m.rows == 40 and len(m.shards) == 6 and m.shards.rows.tolist() == [7, 7, 7, 7, 7, 5]
    assert shard_paths(small_shards, m) == [f"{small_shards}/{f}" for f in files]
    assert shard_paths(small_shards, m, [5, 0]) == [f"{small_shards}/{files[5]}", f"{small_shards}/{files[0]}"]
    assert sum(pq.read_metadata(p).num_rows for p in shard_paths(small_shards, m)) == 40


def test_the_index_is_written_before_the_manifest(small_shards, monkeypatch):
    """A crash after the index and before manifest.json leaves no set that looks complete."""
    os.remove(os.path.join(small_shards, MANIFEST))
    m = schema.Manifest(
        shards=read_index(schema.filesystem_and_path(small_shards)[0], os.path.join(small_shards, INDEX))
    )

    def crash(*a, **k):
        raise RuntimeError("crash before the manifest")

    monkeypatch.setattr(schema, "write_json_atomically", crash)
    with pytest.raises(RuntimeError):
        schema.write_manifest(small_shards, m)
    assert os.path.exists(os.path.join(small_shards, INDEX)) and not os.path.exists(
        os.path.join(small_shards, MANIFEST)
    )
    with pytest.raises(UserError, match="no manifest.json"):
        read_manifest(small_shards)


def test_missing_or_mismatched_index_is_one_clear_error(small_shards):
    raw = json.load(open(os.path.join(small_shards, MANIFEST)))
    json.dump(dict(raw, shards=7), open(os.path.join(small_shards, MANIFEST), "w"))
    with pytest.raises(UserError, match=r"index.parquet: lists 6 shard\(s\), manifest.json says 7; rebuild"):
        read_manifest(small_shards)
    os.remove(os.path.join(small_shards, INDEX))
    with pytest.raises(UserError, match=r"index.parquet: the shard index manifest.json names is missing; rebuild"):
        read_manifest(small_shards)


def test_old_set_is_refused_with_rebuild_or_migrate(small_shards):
    as_v1(small_shards)
    with pytest.raises(UserError, match=r"old format \(schema version 1.*rebuild it .*raysl shards migrate") as err:
        read_manifest(small_shards)
    assert "\n" not in str(err.value) and small_shards in str(err.value)


def test_migrate_keeps_the_set_and_its_streams(small_shards):
    before = read_manifest(small_shards)
    plans = [reader.worker_shards(before, seed=2, epoch=e, rank=r, world_size=2) for e in range(3) for r in range(2)]
    as_v1(small_shards)
    after = legacy.migrate(small_shards)
    assert read_manifest(small_shards) == after
    assert after.shards.files() == before.shards.files() and after.shards.rows.tolist() == before.shards.rows.tolist()
    assert after.shards.table["bytes"].to_pylist() == before.shards.table["bytes"].to_pylist()
    assert (after.written, after.licenses, after.sources) == (before.written, before.licenses, before.sources)
    assert [
        reader.worker_shards(after, seed=2, epoch=e, rank=r, world_size=2) for e in range(3) for r in range(2)
    ] == plans
    assert shard_paths(small_shards, after) == shard_paths(small_shards, before)
    with pytest.raises(UserError, match="not an old .* nothing to migrate"):
        legacy.migrate(small_shards)


def test_migrate_crash_leaves_the_old_set(small_shards, monkeypatch):
    as_v1(small_shards)
    monkeypatch.setattr(schema, "write_json_atomically", lambda *a: (_ for _ in ()).throw(RuntimeError("crash")))
    with pytest.raises(RuntimeError):
        legacy.migrate(small_shards)
    assert len(legacy.read_v1(small_shards).shards) == 6  # still the complete old set
    monkeypatch.undo()
    assert legacy.migrate(small_shards).rows == 40


def test_migrate_names_a_missing_shard_file(small_shards):
    as_v1(small_shards)
    os.remove(os.path.join(small_shards, "shard-00003.parquet"))
    with pytest.raises(UserError, match=r"shard-00003.parquet: listed in manifest.json but not there"):
        legacy.migrate(small_shards)
    assert legacy.read_v1(small_shards).schema_version == 1  # nothing was rewritten
