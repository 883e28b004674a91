"""`raysl shards build --append` checks without Ray: it needs a set and excludes --overwrite,
mixtures pin every set, and existing and new hash rows share one schema."""

import json
import os
import shutil
from types import SimpleNamespace

import pytest
from imagefactory import encode, photo, read_file, write_folder
from shardfactory import digit_images, write_shards

from raysl.data import build, mixture
from raysl.data.shard_index import INDEX
from raysl.errors import UserError


def test_append_needs_a_set_and_excludes_overwrite(tmp_path):
    src = write_folder(tmp_path / "src", {"a.png": encode(photo(40), "PNG")})
    with pytest.raises(UserError, match=r"--append: .*empty: no manifest.json here"):
        build.plan_build([src], str(tmp_path / "empty"), append=True)
    with pytest.raises(UserError, match="pass one of them"):
        build.plan_build([src], str(tmp_path / "empty"), append=True, overwrite=True)
    out = str(tmp_path / "set")
    write_shards(out, digit_images(4), 2)
    with pytest.raises(UserError, match="pass --append to add to it or --overwrite"):
        build.plan_build([src], out)


def test_mixture_pins_every_set(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_shards(a, digit_images(8), 4)
    write_shards(b, digit_images(8), 4)
    data = SimpleNamespace(shards=[a, b], weights=[1.0, 1.0])
    run_dir = str(tmp_path / "run")
    assert mixture.pin(data, run_dir) == {a: INDEX, b: INDEX}
    shutil.copy(os.path.join(a, INDEX), os.path.join(a, "index-3.parquet"))  # an index version of a
    with open(os.path.join(run_dir, mixture.PINS), "w") as f:
        json.dump({"sets": [{"path": a, "index": "index-3.parquet"}]}, f)
    assert mixture.pin(data, run_dir) == {a: "index-3.parquet", b: INDEX}  # recorded pins win; new sets are added
    assert [s["path"] for s in json.loads(read_file(os.path.join(run_dir, mixture.PINS)))["sets"]] == [a, b]


def test_existing_and_new_hash_rows_share_one_schema(monkeypatch):
    """The dedup shuffle concatenates both kinds of rows in its reduce: one schema, whatever
    nullability the shards' parquet or the read's own table carried (a mismatch failed there)."""
    import pyarrow as pa

    from raysl.data.schema import SCHEMA

    shard = pa.table({"sha256": ["ab"]}, schema=pa.schema([SCHEMA.field("sha256")]))  # not null, as in the shards
    assert build._as_existing(shard).schema == build.HASH_SCHEMA
    png = encode(photo(40), "PNG")
    monkeypatch.setattr(build, "read_ref", lambda ref: iter([build.Item(ref["key"], png, "/x")]))
    refs = pa.table({"key": ["a.png"], "_ref": [0]})
    new = list(build._hashes(refs, meta={}, licenses=None, min_side=0, max_pixels=10**8))
    assert [t.schema for t in new] == [build.HASH_SCHEMA] * len(new) and sum(t.num_rows for t in new) == 1
