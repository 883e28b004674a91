"""raysl curate's steps as tasks over embedding parts, run in this process (no Ray): the same
decisions as the in-memory SemDeDup and balanced sample, lineage as parts, and a rerun after
a crash that reuses the finished parts."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from curatefactory import write_embeddings
from shardfactory import write_shards

from raysl.curate import balance, dedup, embeddings
from raysl.curate.steps import run_balance, run_decontaminate, run_dedup
from raysl.data.schema import read_manifest

N, PART = 700, 120  # 6 parts, the last one smaller


@pytest.fixture(autouse=True)
def in_this_process(monkeypatch):
    """The steps' parts run here, one after another, even in a test process where an earlier
    test connected Ray (the steps as Ray tasks: tests/integration/test_curate.py)."""
    from raysl.curate import parts

    monkeypatch.setattr(parts, "_ray", lambda: None)


def _emb(tmp_path, x, name="emb"):
    src = str(tmp_path / f"{name}_src")
    write_shards(src, [(f"{name}/{i:05d}", b"x", None) for i in range(len(x))], shard_size=PART)
    return write_embeddings(src, str(tmp_path / name), [x[i : i + PART] for i in range(0, len(x), PART)])


@pytest.fixture
def planted(tmp_path):
    """(EMB, copy rows, their source rows): random 32-d vectors, 60 of them near-copies of
    rows that are mostly in other parts."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, 32)).astype(np.float32)
    src = rng.choice(N, 60, replace=False)
    copies = rng.choice(np.setdiff1d(np.arange(N), src), 60, replace=False)
    x[copies] = x[src] + 0.03 * rng.standard_normal((60, 32))
    return _emb(tmp_path, x), copies, src


def _lineage(sel):
    return pq.read_table(os.path.join(sel, "lineage.parquet"))  # a folder of parts, read as one table


@pytest.mark.parametrize(
    "keep, margin, coarse",
    [("closest", dedup.DEFAULT_MARGIN, 0), ("first", dedup.DEFAULT_MARGIN, 0), ("closest", 0.2, 3), ("farthest", 0, 0)],
)
def test_dedup_as_tasks_decides_as_the_in_memory_semdedup(planted, tmp_path, keep, margin, coarse):
    emb, copies, src = planted
    sel = str(tmp_path / "sel")
    # a sample as large as the set: the clusters of k-means on all embeddings; small groups:
    # several clusters per dedup task, several tasks (margin 0.2: many images in two clusters,
    # often of two tasks; coarse 3: two-level k-means and its inverted-file assignment)
    kw = dict(clusters=7, threshold=0.95, keep=keep, margin=margin, coarse=coarse)
    curation = run_dedup(emb, sel, sample=N, group_images=150, **kw)
    assert curation["phases"]["dedup"]["tasks"] >= 3
    assert curation["steps"][-1]["coarse"] == (coarse or 1)
    ref = dedup.semdedup(embeddings.load(emb)[2], **kw)
    lineage = _lineage(sel)
    keys = lineage.column("key").to_pylist()
    dropped = np.array(lineage.column("decision").to_pylist()) == "drop"
    assert np.array_equal(dropped, ref["duplicate_of"] >= 0)
    assert np.array_equal(lineage.column("dedup_cluster").to_numpy(), ref["cluster"])
    of = lineage.column("duplicate_of").to_pylist()
    assert [of[i] for i in np.flatnonzero(dropped)] == [keys[j] for j in ref["duplicate_of"][dropped]]
    assert np.allclose(lineage.column("similarity").to_numpy()[dropped], ref["similarity"][dropped])
    # the planted copies are what it found (a pair split over two clusters may be missed)
    pairs = {frozenset((int(a), int(b))) for a, b in zip(copies, src)}
    found = {frozenset((int(i), keys.index(of[i]))) for i in np.flatnonzero(dropped)}
    assert found <= pairs and len(found) >= 50
    assert curation["counts"] | {"kept": 0} == {"embedded": N, "kept": 0, "dropped_duplicate": len(found)} | {
        "dropped_contaminated": 0,
        "dropped_balance": 0,
    }
    assert read_manifest(sel).rows == N - len(found)
    assert sorted(os.listdir(sel)) == ["index.parquet", "lineage.parquet", "manifest.json"]  # no working parts left
    assert sorted(os.listdir(os.path.join(sel, "lineage.parquet"))) == [f"part-{i:05d}.parquet" for i in range(6)]


def test_dedup_on_a_sample_still_finds_the_copies(planted, tmp_path):
    emb, copies, _ = planted
    curation = run_dedup(emb, str(tmp_path / "sel"), clusters=5, sample=200, threshold=0.95)
    dropped = set(np.flatnonzero(np.array(_lineage(tmp_path / "sel").column("reason").to_pylist()) == "duplicate"))
    assert curation["steps"][-1]["sample"] == 200
    assert len(dropped) >= 50 and len(dropped - set(copies.tolist()) - set()) <= 60


def test_a_rerun_after_a_crash_reuses_the_finished_parts(planted, tmp_path, capsys, monkeypatch):
    emb, _, _ = planted
    sel = str(tmp_path / "sel")
    kw = dict(clusters=7, sample=N, threshold=0.95, group_images=150)
    run_dedup(emb, sel, **kw)
    before = _lineage(sel).replace_schema_metadata(None)
    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        _interrupted_dedup(emb, run, kw, monkeypatch)
    lineage_dir = os.path.join(run, "lineage.parquet")
    done = sorted(os.listdir(lineage_dir))
    assert 1 <= len(done) < 6 and not os.path.exists(os.path.join(run, "manifest.json"))
    stamps = {f: os.stat(os.path.join(lineage_dir, f)).st_mtime_ns for f in done}
    capsys.readouterr()
    curation = run_dedup(emb, run, **kw)
    err = capsys.readouterr().err
    assert "k-means of an earlier run reused" in err
    assert "curate dedup: assign: 6 of 6 parts already done, reused" in err
    assert f"curate dedup: lineage: {len(done)} of 6 parts already done, reused" in err
    assert {f: os.stat(os.path.join(lineage_dir, f)).st_mtime_ns for f in done} == stamps
    after = _lineage(run).replace_schema_metadata(None)
    assert after.drop_columns(["similarity"]).equals(before.drop_columns(["similarity"]))
    sims = [t.column("similarity").to_numpy(zero_copy_only=False) for t in (after, before)]
    assert np.array_equal(*sims, equal_nan=True)
    assert curation["counts"]["dropped_duplicate"] == sum(r == "duplicate" for r in before.column("reason").to_pylist())
    # other arguments: the earlier parts are not reused
    run_dedup(emb, run, **(kw | {"threshold": 0.99}), overwrite=True)
    assert "reused" not in capsys.readouterr().err


def _interrupted_dedup(emb, out, kw, monkeypatch):
    """run_dedup, stopped by a Ctrl-C that arrives once its third lineage part is on disk
    (a real kill of `raysl curate dedup`: tests/drills/test_curate_kill.py)."""
    from raysl.curate import parts

    written = []
    real = parts.write

    def write(table, uri, summary=None):
        result = real(table, uri, summary)
        if "lineage.parquet" in uri:
            written.append(uri)
            if len(written) == 3:
                raise KeyboardInterrupt
        return result

    monkeypatch.setattr(parts, "write", write)
    run_dedup(emb, out, **kw)


def test_balance_on_counts_splits_as_the_in_memory_sample(tmp_path):
    rng = np.random.default_rng(0)
    centres = embeddings.normalize(rng.standard_normal((10, 32)))
    labels = np.concatenate([np.zeros(350, int), np.repeat(np.arange(1, 10), 39)])  # class 0: half
    x = embeddings.normalize(centres[labels] + 0.1 * rng.standard_normal((len(labels), 32)))
    emb = _emb(tmp_path, x.astype(np.float32))
    ids = balance.hierarchical_kmeans(embeddings.load(emb)[2], [20, 10], seed=0)
    picked = balance.balanced_sample(ids, 200, seed=0)
    sel = str(tmp_path / "sel")
    run_balance(emb, sel, target=200, levels=[20, 10], sample=len(x), seed=0)
    lineage = _lineage(sel)
    kept = np.flatnonzero(np.array(lineage.column("decision").to_pylist()) == "keep")
    assert len(kept) == read_manifest(sel).rows == 200
    assert np.array_equal(np.array(lineage.column("clusters").to_pylist()), ids)
    # the same number of images from every level-1 cluster (the draw within a cluster differs)
    assert np.array_equal(np.bincount(ids[kept, 0], minlength=20), np.bincount(ids[picked, 0], minlength=20))
    first, parents = balance.fit_tree(embeddings.load(emb)[2], [20, 10])
    shares = balance.cluster_shares(np.bincount(ids[:, 0], minlength=len(first)), parents, 200)
    assert np.array_equal(shares, np.bincount(ids[picked, 0], minlength=20))
    assert balance.split_evenly(10, np.array([1, 8, 8])).tolist() == [1, 5, 4]


def test_decontaminate_then_dedup_chain_per_part(planted, tmp_path):
    emb, copies, src = planted
    x = embeddings.load(emb)[2]
    eval_emb = _emb(tmp_path, x[src[:5]] + 0.001, name="eval")  # near-copies of 5 training images
    clean = str(tmp_path / "clean")
    run_decontaminate(emb, [eval_emb], clean, threshold=0.99)
    contaminated = np.flatnonzero(np.array(_lineage(clean).column("reason").to_pylist()) == "contaminated")
    pairs = dict(zip(src.tolist(), copies.tolist()))
    assert set(src[:5].tolist()) <= set(contaminated.tolist())
    assert set(contaminated.tolist()) <= set(src[:5].tolist()) | {pairs[s] for s in src[:5].tolist()}
    deduped = str(tmp_path / "deduped")
    curation = run_dedup(emb, deduped, sel=clean, clusters=5, sample=N, threshold=0.95)
    assert [s["step"] for s in curation["steps"]] == ["decontaminate", "dedup"]
    reasons = np.array(_lineage(deduped).column("reason").to_pylist())
    assert set(np.flatnonzero(reasons == "contaminated").tolist()) == set(
        contaminated.tolist()
    )  # earlier decisions stay
    assert curation["counts"]["kept"] == N - len(contaminated) - int(np.sum(reasons == "duplicate"))
    assert curation["steps"][-1]["dropped"] == int(np.sum(reasons == "duplicate"))


def test_from_a_selection_with_one_lineage_file(planted, tmp_path):
    """A selection written by an earlier raysl keeps its lineage in one file: --from reads it."""
    import shutil

    emb, _, src = planted
    x = embeddings.load(emb)[2]
    clean = str(tmp_path / "clean")
    run_decontaminate(emb, [_emb(tmp_path, x[src[:5]], name="eval")], clean, threshold=0.99)
    folder = os.path.join(clean, "lineage.parquet")
    whole = pq.read_table(folder)
    shutil.rmtree(folder)
    pq.write_table(whole, folder)
    curation = run_dedup(emb, str(tmp_path / "deduped"), sel=clean, clusters=5, sample=N, threshold=0.95)
    reasons = _lineage(tmp_path / "deduped").column("reason").to_pylist()
    assert reasons.count("contaminated") == whole.column("reason").to_pylist().count("contaminated") >= 5
    assert curation["counts"]["dropped_contaminated"] == reasons.count("contaminated")


def test_scale_bench_embeddings_plant_copies_across_parts_and_are_scored(tmp_path):
    """The synthetic set of `raysl bench curate --scale` (generated in this process): copies of
    vectors in the previous part, found by dedup as tasks and scored from the lineage parts."""
    from raysl.bench import curate_scale
    from raysl.curate.parts import join, part_name

    emb, planted = curate_scale.make_embeddings(str(tmp_path / "scale"), 6000, 64, 1024)
    assert planted == 5 * int(1024 * curate_scale.COPY_FRACTION) + int(880 * curate_scale.COPY_FRACTION)
    sel = str(tmp_path / "sel")
    run_dedup(emb, sel, clusters=6, sample=3000, threshold=0.95, iters=10)
    scored = [curate_scale.score_part(join(sel, "lineage.parquet", part_name(p))) for p in range(6)]
    totals = {k: sum(s[k] for s in scored) for k in ("planted", "dropped", "correct")}
    assert totals["planted"] == planted
    scores = curate_scale._scores(**totals)
    assert scores["precision"] == 1.0 and scores["recall"] >= 0.8, scores
