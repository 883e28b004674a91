"""raysl curate on the local Ray: embed (a Ray Data job), dedup, decontaminate, balance, and
the selection they write, read back by the reader, `shards inspect` and the model card."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from curatefactory import FEATURES, MODEL, write_rows

from raysl.cli import main
from raysl.curate import dedup, embeddings
from raysl.curate.embed import plan_embed, run_embed
from raysl.curate.steps import run_balance, run_decontaminate, run_dedup
from raysl.data import reader
from raysl.data.schema import read_manifest


@pytest.fixture(scope="module")
def emb(ray_local, photos, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("emb") / "emb")
    result = run_embed(plan_embed(photos, MODEL, out, **FEATURES), actors=1, batch_size=8)
    assert result["shards_embedded"] == 6 and result["images_embedded"] == 30
    return out


def test_embed_writes_one_part_per_shard_with_the_model(emb, photos, planted):
    meta = embeddings.read_meta(emb)
    assert meta["model"] == f"timm:{MODEL}@random-init,seed=0,size=112,stage=0,grid=2,input=per-image"
    for s in range(6):
        t = pq.read_table(os.path.join(emb, embeddings.part_name(s)))
        assert t.schema.field("embedding").type == pa.list_(pa.float16(), 256)
        assert t.schema.metadata[embeddings.MODEL_KEY].decode() == meta["model"]
        assert t.column("shard").to_pylist() == [s] * 5 and t.column("row").to_pylist() == list(range(5))
        assert t.column("key").to_pylist() == [r["key"] for r in planted[5 * s : 5 * s + 5]]
    _, table, x = embeddings.load(emb, MODEL)
    assert x.shape == (30, 256) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-3)


def test_dedup_drops_the_planted_copies_and_keeps_one_per_photo(emb, planted, tmp_path):
    sel = str(tmp_path / "sel")
    curation = run_dedup(emb, sel, keep="first")
    lineage = pq.read_table(os.path.join(sel, "lineage.parquet")).to_pylist()
    group = {r["key"]: r["group"] for r in planted}
    kept = [r["key"] for r in lineage if r["decision"] == "keep"]
    dropped = [r for r in lineage if r["decision"] == "drop"]
    correct = sum(group[r["duplicate_of"]] == group[r["key"]] for r in dropped)
    recall, precision = correct / 24, correct / max(len(dropped), 1)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    assert {r["reason"] for r in dropped} == {"duplicate"}
    # --keep first keeps the first image of each group in set order: the originals
    assert {k for k in kept if k.endswith("original.png")} == {r["key"] for r in planted if r["original"]}
    assert curation["counts"]["dropped_duplicate"] == len(dropped)
    assert curation["steps"][-1]["threshold"] == dedup.DEFAULT_THRESHOLD


def test_selection_is_read_by_the_reader_inspect_and_the_model_card(emb, photos, planted, tmp_path):
    from raysl.data.inspect import contact_sheet, format_inspect, inspect_shards
    from raysl.eval.model_card import curation_section, lineage

    sel = str(tmp_path / "sel")
    run_dedup(emb, sel)
    rows = pq.read_table(os.path.join(sel, "lineage.parquet")).to_pylist()
    kept = {r["key"] for r in rows if r["decision"] == "keep"}
    assert 6 <= len(kept) < 30
    manifest = read_manifest(sel)
    assert manifest.rows == len(kept)
    # no image bytes were rewritten: the selection's files are its index, manifest and lineage
    assert sorted(os.listdir(sel)) == ["index.parquet", "lineage.parquet", "manifest.json"]
    assert all(f.startswith(photos) for f in manifest.shards.files())
    stream = reader.read_rows(sel, seed=0).take_all()  # what raysl pretrain reads as data.shards
    by_key = {r["key"]: r["image"] for r in planted}
    assert sorted(r["key"] for r in stream) == sorted(kept)
    assert all(r["image"] == by_key[r["key"]] for r in stream)
    stats = inspect_shards(sel)
    assert stats["images"] == len(kept)
    assert "selection (raysl curate)" in format_inspect(stats)
    assert contact_sheet(sel, str(tmp_path / "grid.png"), samples=len(kept)) == len(kept)
    facts = lineage(sel, str(tmp_path))
    with open(tmp_path / "ATTRIBUTIONS.csv") as f:
        assert {line.split(",")[0].strip('"') for line in f.read().splitlines()[1:]} == kept
    assert facts["rows"] == len(kept)
    assert len(facts["curation"]) == 1
    card = "\n".join(curation_section(facts["curation"]))
    assert "## Curation" in card and "dedup" in card and f'"kept": {len(kept)}' not in card
    assert f"| kept | {len(kept)} |" in card


def test_decontaminate_then_balance_chain_with_lineage(ray_local, emb, photos, planted, tmp_path):
    # an "eval set" that holds copies of two of the photographs
    eval_rows = [r for r in planted if r["original"]][:2]
    eval_shards = write_rows(
        str(tmp_path / "eval"), [{"key": f"eval/{i}", "image": r["image"]} for i, r in enumerate(eval_rows)], 5
    )
    eval_emb = str(tmp_path / "eval_emb")
    run_embed(plan_embed(eval_shards, MODEL, eval_emb, **FEATURES), actors=1)
    clean = str(tmp_path / "clean")
    curation = run_decontaminate(emb, [eval_emb], clean)
    rows = pq.read_table(os.path.join(clean, "lineage.parquet")).to_pylist()
    contaminated = {r["key"] for r in rows if r["reason"] == "contaminated"}
    groups = {r["group"] for r in eval_rows}
    copies = {r["key"] for r in planted if r["group"] in groups}  # the 2 originals and their 8 copies
    assert contaminated <= copies and len(contaminated) >= 9, sorted(copies - contaminated)
    balanced = str(tmp_path / "balanced")
    curation = run_balance(emb, balanced, sel=clean, target=5, levels=[4, 2])
    assert [s["step"] for s in curation["steps"]] == ["decontaminate", "balance"]
    rows = pq.read_table(os.path.join(balanced, "lineage.parquet")).to_pylist()
    assert sum(r["decision"] == "keep" for r in rows) == read_manifest(balanced).rows == 5
    assert all(r["reason"] == "contaminated" for r in rows if r["key"] in contaminated)  # earlier decisions stay
    assert all(len(r["clusters"]) == 2 for r in rows if r["key"] not in contaminated)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dedup", "--model", "resnet50"], "embedded with 'timm:resnet18@"),
        (["decontaminate", "--eval", "{tmp}/no_such_eval"], "--eval {tmp}/no_such_eval: no such folder"),
        (["balance", "--target", "31"], "--target 31: the set has 30 candidate image(s)"),
        (["dedup", "--margin", "-0.1"], "--margin -0.1: a cosine difference in [0, 2)"),
    ],
)
def test_bad_input_is_one_error_line_before_any_work(emb, tmp_path, capsys, restore_environ, argv, message):
    out = str(tmp_path / "out")
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert main(["curate", argv[0], "--emb", emb, "--out", out, *argv[1:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message.format(tmp=tmp_path) in err, err
    assert not os.path.exists(out)


def test_embed_refuses_an_embedding_folder_of_another_model(photos, emb, capsys, restore_environ):
    argv = ["curate", "embed", "--shards", photos, "--model", "resnet34", "--out", emb]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "use another --out" in err and len(err.strip().splitlines()) == 1
    assert json.load(open(os.path.join(emb, embeddings.META)))["model"].startswith("timm:resnet18@")


def test_pretrain_reads_a_selection_and_its_model_card_lists_the_curation(ray_local, tmp_path):
    """A real 2-step run on a balanced selection of digits; its exported card shows the steps,
    and the run's own backbone can embed (--model RUN_DIR)."""
    from shardfactory import digit_images, write_shards

    from raysl.config import load_config
    from raysl.eval.export import export
    from raysl.pretrain import pretrain

    shards = str(tmp_path / "digits")
    write_shards(shards, digit_images(48), shard_size=16)
    emb = str(tmp_path / "emb")
    run_embed(plan_embed(shards, "test_vit", emb, image_size=32), actors=1)
    sel = str(tmp_path / "sel")
    run_balance(emb, sel, target=32, levels=[6, 2])
    overrides = ["data.image_size=32", "data.batch_size=8", "model.backbone=test_vit", "method.proj_hidden_dim=32"]
    overrides += ["method.proj_dim=16", "optim.name=adamw", "deepspeed.zero_stage=0", "train.num_workers=1"]
    overrides += ["train.max_steps=2", "train.checkpoint_every=2", f"train.storage_path={tmp_path / 'runs'}"]
    cfg = load_config("quickstart", [f"data.shards={sel}", "train.name=curated", *overrides])
    run = pretrain(cfg)["run_dir"]
    export(run, str(tmp_path / "export"))
    card = open(tmp_path / "export" / "README.md").read()
    assert "## Curation" in card and "| kept | 32 |" in card and '"step": "balance"' in card
    with open(tmp_path / "export" / "ATTRIBUTIONS.csv") as f:
        assert len(f.read().splitlines()) == 1 + 32  # header + the selected images only
    result = run_embed(plan_embed(shards, run, str(tmp_path / "emb_run")), actors=1)
    assert result["model"].startswith(f"run:{run}@step=2") and result["images_embedded"] == 48


@pytest.mark.parametrize("clusters", [0, 3])
def test_dedup_as_ray_tasks_keeps_what_the_in_memory_semdedup_keeps(emb, tmp_path, clusters):
    """On the planted photographs, same seed and threshold: the same kept images and the same
    duplicate_of (the default sample holds the whole set, so the clusters are the same)."""
    sel = str(tmp_path / "sel")
    curation = run_dedup(emb, sel, clusters=clusters)
    assert curation["phases"]["assign"]["tasks"] == 6 and curation["phases"]["lineage"]["tasks"] == 6
    _, table, x = embeddings.load(emb)
    ref = dedup.semdedup(x, clusters=clusters or 1, threshold=dedup.DEFAULT_THRESHOLD, keep="closest", seed=0)
    keys = table.column("key").to_pylist()
    lineage = pq.read_table(os.path.join(sel, "lineage.parquet"))
    assert lineage.column("key").to_pylist() == keys
    kept = {k for k, d in zip(keys, lineage.column("decision").to_pylist()) if d == "keep"}
    assert kept == {k for k, d in zip(keys, ref["duplicate_of"]) if d < 0}
    assert lineage.column("duplicate_of").to_pylist() == [keys[d] if d >= 0 else None for d in ref["duplicate_of"]]
    assert lineage.column("dedup_cluster").to_pylist() == ref["cluster"].tolist()


def test_curate_reads_and_writes_on_a_bucket(s3, emb, tmp_path):
    """Embeddings and selections on a bucket: dedup, then balance --from the bucket selection,
    decide as on disk."""
    import pyarrow.fs as pafs

    bucket = s3.bucket()
    pafs.copy_files(emb, f"{bucket}/emb".removeprefix("s3://"), destination_filesystem=s3.filesystem())
    remote_emb = f"{bucket}/emb"
    run_dedup(remote_emb, f"{bucket}/sel", clusters=3)
    run_balance(remote_emb, f"{bucket}/bal", sel=f"{bucket}/sel", target=5, levels=[4, 2])
    run_dedup(emb, str(tmp_path / "sel"), clusters=3)
    run_balance(emb, str(tmp_path / "bal"), sel=str(tmp_path / "sel"), target=5, levels=[4, 2])
    for name in ("sel", "bal"):
        fs, path = s3.filesystem(), f"{bucket}/{name}/lineage.parquet".removeprefix("s3://")
        remote = pq.read_table(path, filesystem=fs).drop_columns(["similarity"])
        local = pq.read_table(str(tmp_path / name / "lineage.parquet")).drop_columns(["similarity"])
        assert remote.replace_schema_metadata(None).to_pylist() == local.replace_schema_metadata(None).to_pylist()
        assert read_manifest(f"{bucket}/{name}").rows == read_manifest(str(tmp_path / name)).rows
    assert read_manifest(f"{bucket}/bal").rows == 5
    assert read_manifest(f"{bucket}/bal").curation["emb"] == remote_emb
