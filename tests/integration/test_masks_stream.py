"""Patch masks carried next to unchanged views through the streaming pipeline on the local Ray."""

from __future__ import annotations

import dataclasses

import numpy as np

from raysl.data import view_plans as VP
from raysl.data.masks import MultiBlockMasks, draw_masks

# ---------------------------------------------------------------- views + masks


def test_masks_come_through_the_streaming_reader(ray_local, tmp_path):
    """read_views + ViewBatches on a small shard set: each batch row's masks are those of
    its row's aug_seed, also around a dropped row."""
    from shardfactory import digit_images, write_shards

    from raysl.data import reader

    images = digit_images(10)
    images[4] = ("digits/broken.png", images[4][1][:40], 0)
    d = str(tmp_path / "s")
    write_shards(d, images, shard_size=5)
    spec = dataclasses.replace(VP.view_spec("mae", size=32), masks=MultiBlockMasks((8, 8), min_keep=4))
    seeds = {r["key"]: r["aug_seed"] for r in reader.read_rows(d, seed=1).take_all()}
    batches = list(reader.ViewBatches(reader.read_views(d, spec, seed=1, batch_size=4), batch_size=3))
    assert len(batches) == 3  # 9 good rows
    for batch in batches:
        assert batch["masks"].shape == (3, 5, 8, 8) and batch["masks"].dtype == np.uint8
        for key, got in zip(batch["key"], batch["masks"]):
            assert np.array_equal(got, draw_masks(spec.masks, seeds[key])), key
    assert "digits/broken.png" not in {k for b in batches for k in b["key"]}
