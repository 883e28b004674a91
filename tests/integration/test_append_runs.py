"""`raysl shards build --append` on the local Ray: new shards and a new index version, and a
run keeps reading the version it started with."""

import json
import os

import pytest
import ray
from imagefactory import encode, photo, read_file, write_folder
from shardfactory import digit_images, set_content, write_shards

from raysl.data import build, mixture, reader
from raysl.data.schema import MANIFEST, read_manifest, shard_paths
from raysl.data.shard_index import INDEX
from raysl.errors import UserError


def _files(out):
    return {f: read_file(os.path.join(out, f), "rb") for f in os.listdir(out) if f.endswith(".parquet")}


def test_append_adds_shards_and_a_new_index_version(tmp_path, ray_local, monkeypatch):
    pngs = [encode(photo(40 + 4 * i), "PNG") for i in range(9)]
    first = write_folder(tmp_path / "batch1", {f"{i}.png": pngs[i] for i in range(5)})
    out = str(tmp_path / "out")
    build.build_shards([first], out, shard_size=2)
    before_files, before_rows = _files(out), set_content(out)
    # 3 new images, 2 already in the set under other names, 1 copy of a new one
    second = write_folder(
        tmp_path / "batch2",
        {"a.png": pngs[5], "b.png": pngs[6], "c.png": pngs[7], "old0.png": pngs[0], "old3.png": pngs[3]}
        | {"z_copy.png": pngs[7]},
    )
    reads = []
    real = ray.data.read_parquet
    monkeypatch.setattr(ray.data, "read_parquet", lambda paths, **kw: reads.append((paths, kw)) or real(paths, **kw))
    plan = build.plan_build([second], out, shard_size=2, append=True)
    m = build.run_build(plan)
    # the set's shards were read for their sha256 column only, never their images
    assert [kw.get("columns") for _, kw in reads] == [["sha256"]]
    assert sorted(reads[0][0]) == sorted(shard_paths(out, plan.existing))
    assert plan.added.written == 3 and plan.added.skipped["duplicate"] == 3
    assert (m.written, m.rows, m.skipped["duplicate"], m.index_version) == (8, 8, 3, 1)
    assert m.source_images == {"batch1": 5, "batch2": 3} and m.sources == [first, second]
    # the old version is untouched: same files, same bytes; the new version adds files only
    after = _files(out)
    assert all(after[f] == data for f, data in before_files.items())
    assert set(after) - set(before_files) == {"index-1.parquet"} | {s for s in m.shards.files() if "-v1-" in s}
    raw = json.loads(read_file(os.path.join(out, MANIFEST)))
    assert (raw["index"], raw["index_version"], raw["shards"], raw["rows"]) == ("index-1.parquet", 1, 5, 8)
    rows = set_content(out)
    assert set(rows) == set(before_rows) | {"batch2/a.png", "batch2/b.png", "batch2/c.png"}
    assert all(rows[k] == v for k, v in before_rows.items())
    assert set_content(out, INDEX) == before_rows  # index version 0 still reads the set as it was
    summary = build.format_summary(m, plan)
    assert summary.startswith("appended 3 images in 2 new shard(s); the set now has 8 images in 5 shard(s)")
    assert "duplicate 3" in summary
    # a second append is version 2; nothing new is a new version with the same shards
    m2 = build.build_shards([second], out, shard_size=2, append=True)
    assert (m2.index_version, m2.rows, len(m2.shards)) == (2, 8, 5)
    assert read_manifest(out).index_file == "index-2.parquet" and os.path.exists(os.path.join(out, "index-1.parquet"))


def test_a_run_keeps_reading_the_set_it_started_with(tmp_path, ray_local, monkeypatch):
    from raysl import pretrain as run
    from raysl.config import load_config
    from raysl.train import steps as loop

    shards = str(tmp_path / "web")
    write_shards(shards, [(f"web/{i:02d}.png", png, lab) for i, (_, png, lab) in enumerate(digit_images(24))], 4)
    cfg = load_config("quickstart", [f"data.shards={shards}", "data.batch_size=2", "train.epochs=3"])
    run_dir = str(tmp_path / "runs" / "r")
    pins = mixture.pin(cfg.data, run_dir)  # what make_trainer does when the run first starts
    assert pins == {shards: INDEX}
    recorded = json.loads(read_file(os.path.join(run_dir, mixture.PINS)))["sets"]
    assert [(s["path"], s["index"], s["shards"], s["rows"]) for s in recorded] == [(shards, INDEX, 6, 24)]
    stream = [r["key"] for r in reader.read_rows(shards, seed=1, rank=1, world_size=2, index=pins[shards]).take_all()]
    steps = loop.epoch_steps(cfg, 2, 3, pins)

    new = write_folder(tmp_path / "more", {f"{i}.png": encode(photo(40 + i), "PNG") for i in range(8)})
    assert build.build_shards([new], shards, shard_size=4, append=True).rows == 32  # appended mid-run

    again = mixture.pin(cfg.data, run_dir)  # a resumed attempt of the same run
    assert again == pins
    assert loop.epoch_steps(cfg, 2, 3, again) == steps
    assert [
        r["key"] for r in reader.read_rows(shards, seed=1, rank=1, world_size=2, index=again[shards]).take_all()
    ] == (stream)
    # the workers get the pins from make_trainer
    seen = {}

    class Trainer:
        def __init__(self, fn, *, train_loop_config, **kw):
            seen.update(train_loop_config)

    monkeypatch.setattr("ray.train.torch.TorchTrainer", Trainer)
    run.make_trainer(cfg, run_dir)
    assert seen["shard_pins"] == pins
    # a new run reads the set as it is now
    fresh = mixture.pin(cfg.data, str(tmp_path / "runs" / "new"))
    assert fresh == {shards: "index-1.parquet"} and loop.epoch_steps(cfg, 2, 3, fresh) != steps
    # a set rebuilt with --overwrite: the pinned run stops with one clear line, never reads other shards
    build.build_shards([new], shards, shard_size=4, overwrite=True)
    assert read_manifest(shards).index_file == "index-2.parquet" and not os.path.exists(os.path.join(shards, INDEX))
    with pytest.raises(UserError, match="index.parquet: the shard index this run started with is gone"):
        mixture.from_config(cfg.data, again)
    with pytest.raises(UserError, match="not an index file name"):
        read_manifest(shards, "../x.parquet")
