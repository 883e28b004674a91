"""Shard builder input checks, without Ray: bad sources, outputs and metadata are one clear
error before any work; the dedup pass keeps only what it needs."""

import hashlib
import os

import pyarrow as pa
import pytest
from imagefactory import encode, photo, write_file

from raysl.data import build
from raysl.data.metadata import read_rows
from raysl.errors import UserError

# ---------------------------------------------------------------- dedup moves hashes, not images


def test_dedup_pass_keeps_only_hash_key_and_input(monkeypatch):
    """The rows the dedup shuffle gets: (sha256, key, input id) of images the filters keep, no
    bytes; what it returns; and the second read dropping the keys its input row carries."""
    png = encode(photo(64), "PNG")
    datas = {"a.png": png, "b.png": png, "small.png": encode(photo(16), "PNG")}
    monkeypatch.setattr(build, "read_ref", lambda ref: iter([build.Item(ref["key"], datas[ref["key"]], "/x")]))
    refs = pa.table({"key": list(datas), "_ref": [0, 1, 2]})
    options = dict(meta={}, licenses=None, min_side=32, max_pixels=10**8)
    out = pa.concat_tables(build._hashes(refs, **options))
    assert out.column_names == ["sha256", "key", "_ref"]
    assert out.to_pylist() == [
        {"sha256": hashlib.sha256(png).hexdigest(), "key": k, "_ref": r} for k, r in (("a.png", 0), ("b.png", 1))
    ]
    group = pa.table({"sha256": ["h"] * 3, "key": ["c", "a", "b"], "_ref": [7, 8, 9]})
    assert build._duplicates(group).to_pylist() == [{"key": "c", "_ref": 7}, {"key": "b", "_ref": 9}]
    refs = refs.append_column("_drop", pa.array([[], ["b.png"], []], pa.list_(pa.string())))
    rows = pa.concat_tables(build._read_batch(refs, **options))
    images, counts = build._split(rows)
    assert images["key"].to_pylist() == ["a.png"] and counts == {"duplicate": 1, "too_small": 1}


# ---------------------------------------------------------------- user errors (no Ray job runs)


def test_missing_src_and_duplicate_names(tmp_path):
    with pytest.raises(UserError, match="nope"):
        build.build_shards([str(tmp_path / "nope")], str(tmp_path / "out"))
    for d in ("a/imgs", "b/imgs"):
        write_file(str(tmp_path / d / "x.png"), encode(photo(), "PNG"))
    with pytest.raises(UserError, match="same name"):
        build.build_shards([str(tmp_path / "a/imgs"), str(tmp_path / "b/imgs")], str(tmp_path / "out"))
    write_file(str(tmp_path / "notes" / "a.txt"), b"text")
    with pytest.raises(UserError, match="no images found"):
        build.build_shards([str(tmp_path / "notes")], str(tmp_path / "out"))


def test_unwritable_out(tmp_path):
    write_file(str(tmp_path / "imgs" / "x.png"), encode(photo(), "PNG"))
    write_file(str(tmp_path / "afile"), b"")
    out = str(tmp_path / "afile" / "out")  # a path below a regular file: unwritable even for root
    with pytest.raises(UserError, match="afile"):
        build.build_shards([str(tmp_path / "imgs")], out)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("m.jsonl", '{"key": "a/x.png"}\n{"key": "a/y.png"}\n{"key": \n', r"m.jsonl:3: not valid JSON"),
        ("m.jsonl", '{"key": "a/x.png"}\n{"license": "cc0"}\n', r"m.jsonl:2: .*neither a `path` nor a `key`"),
        ("m.jsonl", '{"key": "a/x.png", "label": 1.5}\n', r"m.jsonl:1: label must be an integer"),
        ("m.jsonl", '["a/x.png"]\n', r"m.jsonl:1: .*JSON object"),
        ("m.csv", "path,label\nx.png,1\ny.png,cat\n", r"m.csv:3: label must be an integer"),
        ("m.csv", "path,label\nx.png,1\n,2\n", r"m.csv:3: .*neither"),
        ("m.csv", "path,label\nx.png,1\nx.png,2\n", r"m.csv:3: a/x.png already has metadata on line 2"),
        ("m.txt", "path\nx.png\n", r"m.txt: metadata must be"),
    ],
)
def test_malformed_metadata_names_the_line(tmp_path, name, text, match):
    write_file(str(tmp_path / "a" / "x.png"), encode(photo(), "PNG"))
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError, match=match):
        build.build_shards([str(tmp_path / "a")], str(tmp_path / "out"), metadata=str(tmp_path / name))
    assert not os.path.exists(tmp_path / "out")  # checked before anything is written


def test_metadata_rows_ignore_unknown_columns(tmp_path):
    (tmp_path / "m.csv").write_text("key,license,caption,label\na/x.png,CC0,a cat, 3\n")
    assert read_rows(str(tmp_path / "m.csv")) == [(2, {"key": "a/x.png", "license": "CC0", "label": 3})]
    with pytest.raises(UserError, match="m2.csv: metadata file not found"):
        read_rows(str(tmp_path / "m2.csv"))


@pytest.mark.parametrize("case", ["missing_src", "unwritable_out", "bad_metadata"])
def test_cli_checks_src_out_and_metadata_before_starting_ray(tmp_path, monkeypatch, capsys, case):
    import raysl.runtime
    from raysl import cli

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the arguments were checked")

    monkeypatch.setattr(raysl.runtime, "init_ray", no_ray)
    write_file(str(tmp_path / "imgs" / "x.png"), encode(photo(), "PNG"))
    write_file(str(tmp_path / "afile"), b"")
    (tmp_path / "m.csv").write_text("path,label\nx.png,cat\n")
    argv = {
        "missing_src": [str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")],
        "unwritable_out": [str(tmp_path / "imgs"), "--out", str(tmp_path / "afile" / "out")],
        "bad_metadata": [str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--metadata", str(tmp_path / "m.csv")],
    }[case]
    assert cli.main(["shards", "build", *argv]) == 2
    err = capsys.readouterr().err
    assert {"missing_src": "nowhere", "unwritable_out": "afile", "bad_metadata": "m.csv:2"}[case] in err


# ---------------------------------------------------------------- the order images are written in


def test_class_folders_are_written_in_a_seeded_mixed_order(tmp_path):
    """A folder per class is listed in path order, so written as listed every shard would
    hold one class; input_order mixes them (every shard of 16 holds at least half of the 8
    classes), the same way for the same seed, and keeps containers first. Without a
    seed the listing order is kept."""
    png = encode(photo(8), "PNG")
    for c in range(8):
        for i in range(16):
            write_file(str(tmp_path / "src" / f"class{c}" / f"{i:02d}.png"), png)
    write_file(str(tmp_path / "src" / "extra.tar"), b"")
    inputs = build.list_inputs([str(tmp_path / "src")])
    kinds = inputs.refs.column("kind").to_pylist()
    keys = inputs.refs.column("key").to_pylist()

    def classes_per_shard(order):
        files = [keys[i].split("/")[1] for i in order if kinds[i] == "file"]
        return [len(set(files[s : s + 16])) for s in range(0, len(files), 16)]

    listed = build.input_order(kinds, None)
    assert kinds[listed[0]] == "tar" and classes_per_shard(listed) == [1] * 8
    mixed = build.input_order(kinds, 0)
    assert sorted(mixed) == list(range(len(kinds))) and kinds[mixed[0]] == "tar"
    assert min(classes_per_shard(mixed)) >= 4
    assert build.input_order(kinds, 0) == mixed and build.input_order(kinds, 1) != mixed


def test_build_arguments_choose_the_order():
    import argparse

    p = argparse.ArgumentParser()
    build.add_arguments(p)
    assert p.parse_args(["src", "--out", "o"]).seed == 0
    args = p.parse_args(["src", "--out", "o", "--seed", "5", "--keep-order"])
    assert args.seed == 5 and args.keep_order
