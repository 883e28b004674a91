"""A selection (raysl curate's output) is read as the rows it keeps by every reader of whole
shard files, and refuses to be read once the set it points into was rebuilt. The selection
is made by the real `selection` functions (lineage parts, then the index) from embedding parts
written here (no Ray)."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.csv
import pyarrow.parquet as pq
import pytest
from shardfactory import digit_images, write_shards

from raysl.curate import embeddings
from raysl.curate import selection as curate_selection
from raysl.data.schema import read_manifest, shard_files, write_manifest
from raysl.data.shard_index import ShardIndex
from raysl.errors import UserError

IMAGES = 24  # 3 shards of 8
DROPPED = [1, 2, 9, 17, 23]  # rows of the source left out of the selection, from every shard


def _embeddings(source: str, emb: str) -> None:
    """EMB for `source` as `raysl curate embed` lays it out: one part per shard, rows in order."""
    manifest = read_manifest(source)
    os.makedirs(emb)
    with open(os.path.join(emb, embeddings.META), "w") as f:
        json.dump({"shards": len(manifest.shards), "source": source, "model": "test-model", "image_size": 32}, f)
    rng = np.random.default_rng(0)
    for s, (path, _) in enumerate(shard_files(source, manifest)):
        keys = pq.read_table(path, columns=["key"]).column("key").to_pylist()
        vectors = rng.standard_normal((len(keys), 8)).astype(np.float16)
        table = pa.table(
            {
                "key": keys,
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8),
                "shard": pa.array([s] * len(keys), pa.int32()),
                "row": pa.array(range(len(keys)), pa.int64()),
            },
            schema=embeddings.emb_schema(8, "test-model"),
        )
        pq.write_table(table, os.path.join(emb, embeddings.part_name(s)))


@pytest.fixture
def selection(tmp_path):
    """(source set, selection of it without the DROPPED rows, the kept keys)."""
    source, emb, sel = (str(tmp_path / n) for n in ("source", "emb", "sel"))
    images = digit_images(IMAGES)
    write_shards(source, images, shard_size=8)
    _embeddings(source, emb)
    meta, summaries = embeddings.read_meta(emb), []
    for s, uri in enumerate(embeddings.part_uris(emb, meta)):
        cols = curate_selection.start(embeddings.read_part(uri, meta["model"], ["key", "shard", "row"]), None)
        curate_selection.drop(cols, np.array([i - 8 * s for i in DROPPED if i // 8 == s], np.int64), "duplicate")
        lineage_part = os.path.join(sel, curate_selection.LINEAGE, embeddings.part_name(s))
        summaries.append(curate_selection.finish(cols, lineage_part, s))
    curate_selection.write(sel, emb, meta, {}, {"step": "dedup"}, summaries)
    kept = [key for i, (key, _, _) in enumerate(images) if i not in DROPPED]
    return source, sel, kept, images


def test_labeled_sets_read_only_the_selected_rows(selection):
    from raysl.eval.labeled import check_labeled, load_labeled

    _, sel, kept, images = selection
    assert check_labeled(sel) == len(kept)
    pixels, labels = load_labeled(sel, 32)
    assert len(pixels) == len(kept)
    assert labels.tolist() == [label for i, (_, _, label) in enumerate(images) if i not in DROPPED]


def test_pictures_sample_only_selected_images(selection):
    from raysl.eval.labeled import load_labeled
    from raysl.eval.pictures import sample_images

    source, sel, kept, _ = selection
    picked = sample_images(sel, IMAGES, 32)
    assert len(picked) == len(kept)
    assert np.array_equal(picked.numpy(), load_labeled(sel, 32)[0].numpy())
    assert len(sample_images(source, IMAGES, 32)) == IMAGES


def test_bench_data_reads_only_selected_images(selection):
    from raysl.bench.data import read_images

    _, sel, kept, images = selection
    by_key = {key: data for key, data, _ in images}
    assert read_images(sel) == [by_key[key] for key in kept]


def test_attributions_list_only_selected_rows(selection, tmp_path):
    from raysl.eval.model_card import write_attributions

    _, sel, kept, _ = selection
    rows, _ = write_attributions(sel, str(tmp_path / "ATTRIBUTIONS.csv"))
    written = pyarrow.csv.read_csv(tmp_path / "ATTRIBUTIONS.csv").column("key").to_pylist()
    assert rows == len(kept) and written == kept


def test_a_rebuilt_source_is_refused_in_one_line_and_an_appended_one_is_not(selection):
    from raysl.eval.labeled import load_labeled

    source, sel, kept, images = selection
    # an append lists the same shard files, unchanged, plus new ones in a new index version
    manifest = read_manifest(source)
    extra = os.path.join(os.path.dirname(source), "extra")
    added = write_shards(extra, digit_images(8), shard_size=8)
    table = pa.concat_tables([manifest.shards.table, added.shards.table])
    appended = ShardIndex(
        table.set_column(0, "file", pa.array([*manifest.shards.files(), f"{extra}/shard-00000.parquet"]))
    )
    manifest.shards, manifest.index_version = appended, 1
    write_manifest(source, manifest)
    assert read_manifest(sel).rows == len(kept)
    # a rebuild (--overwrite) rewrites the files the selection's masks point into
    write_shards(source, list(reversed(images))[:20], shard_size=8)
    with pytest.raises(UserError) as refused:
        read_manifest(sel)
    message = str(refused.value)
    assert sel in message and source in message and "changed" in message and "\n" not in message
    with pytest.raises(UserError, match="changed"):
        load_labeled(sel, 32)
