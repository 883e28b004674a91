"""Mixtures of shard sets on the local Ray: the weights' proportions in every batch, streams
deterministic per (seed, epoch, rank) and resumable at a position, images drawn per set in
the metrics of a real run, and a bad weight reported by the CLI in a fresh process."""

import json
import os
import subprocess
import sys

import numpy as np
from shardfactory import digit_images, mixture_data, write_shards

from raysl.config import load_config
from raysl.data import mixture, reader


def _rows(mix, **kw):
    """open_set for MixedBatches without decoding: the sets' raw row streams."""
    return lambda s, start: reader.read_rows(s.path, start=start, index=s.index, **kw)


def _batches(mix, *, seed=0, epoch=0, rank=0, world_size=1, batch_size=4, start=0, drawn=None):
    kw = dict(seed=seed, epoch=epoch, rank=rank, world_size=world_size)
    stream = mix.batches(_rows(mix, **kw), **kw, batch_size=batch_size, start=start, drawn=drawn)
    return stream, [[str(k) for k in b["key"]] for b in stream]


def test_mixed_stream_is_weighted_deterministic_and_resumable(ray_local, mixture_sets):
    curated, web = mixture_sets
    mix = mixture.from_config(mixture_data([curated, web], [0.25, 0.75]))
    drawn = {}
    stream, keys = _batches(mix, seed=3, drawn=drawn)
    assert len(keys) == 13 and all(len(b) == 4 for b in keys)  # 52 rows: 13 batches of 4
    # every batch holds the weights' proportions: 1 curated + 3 web, in the round's order
    assert all(sum(k.startswith("curated/") for k in b) == 1 for b in keys)
    flat = [k for b in keys for k in b]
    assert len(set(flat)) == 52  # no image twice in an epoch
    assert drawn == {"curated": 13, "web": 39} and stream.position == 52 and stream.skipped == 0
    # the same (seed, epoch, rank) gives the same batches; another epoch or seed others
    assert _batches(mix, seed=3)[1] == keys
    assert _batches(mix, seed=3, epoch=1)[1] != keys and _batches(mix, seed=4)[1] != keys
    # each set's rows come in the order of its own stream (the single-set plan, untouched)
    web_alone = [r["key"] for r in reader.read_rows(web, seed=3).take_all()]
    assert [k for k in flat if k.startswith("web/")] == web_alone[:39]
    # resuming at a saved position (rows of the mixed stream consumed) replays the rest exactly
    for step in (1, 5, 12):
        resumed, rest = _batches(mix, seed=3, start=4 * step)
        assert rest == keys[step:] and resumed.position == 52
    # the `pos` of a batch is its position in the mixed stream, `set` its index in data.shards
    first = next(iter(mix.batches(_rows(mix, seed=3), seed=3, epoch=0, rank=0, world_size=1, batch_size=4)))
    assert first["pos"].tolist() == [0, 1, 2, 3] and sorted(first["set"].tolist()) == [0, 1, 1, 1]


def test_ranks_read_disjoint_parts_of_each_set(ray_local, mixture_sets):
    curated, web = mixture_sets
    mix = mixture.from_config(mixture_data([curated, web], [1, 1]))
    parts = [{k for b in _batches(mix, seed=1, rank=r, world_size=2, batch_size=2)[1] for k in b} for r in range(2)]
    assert parts[0] and parts[1] and not parts[0] & parts[1]
    steps = mix.steps_per_epoch(batch_size=2, seed=1, epoch=0, world_size=2)
    assert min(len(p) for p in parts) >= 2 * steps


def test_undecodable_images_are_skipped_and_the_batch_shape_kept(ray_local, tmp_path):
    images = digit_images(24)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    broken = [(f"a/{i}.png", png[:40] if i == 2 else png, lab) for i, (_, png, lab) in enumerate(images[:12])]
    write_shards(a, broken, 6)
    write_shards(b, [(f"b/{i}.png", png, lab) for i, (_, png, lab) in enumerate(images[12:])], 6)
    from raysl.data.view_plans import view_spec

    spec = view_spec("eval", size=32)
    mix = mixture.from_config(mixture_data([a, b], [1, 1]))

    def views(s, start):
        return reader.read_views(s.path, spec, seed=0, start=start, index=s.index)

    drawn = {}
    stream = mix.batches(views, seed=0, epoch=0, rank=0, world_size=1, batch_size=4, drawn=drawn)
    got = list(stream)
    assert len(got) == 5 and all(g["view_0"].shape == (4, 3, 32, 32) for g in got)  # 23 good of 24: 5 x 4
    assert stream.skipped == 1 and "a/2.png" not in {k for g in got for k in g["key"]}
    # 21 positions (a, b, a, ... a) for 20 images: the broken one's position is spent, not refilled from b
    assert stream.position == 21 and drawn == {"a": 10, "b": 10}


def test_cli_reports_a_bad_weight_before_starting_ray(mixture_sets):
    curated, web = mixture_sets
    done = subprocess.run(
        [sys.executable, "-m", "raysl.cli", "pretrain", "quickstart", f"data.shards=[{curated}, {web}]"]
        + ["data.weights=[0, 0]"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "config key data.weights: all weights are 0" in lines[0]
    assert "Ray" not in done.stdout + done.stderr


def _run_config(shards: list[str], weights: str, storage_path, name: str, *extra: str):
    """A real 1-worker run of 4 steps on a mixture, checkpointed every 2 steps."""
    return load_config(
        "quickstart",
        [
            f"data.shards=[{', '.join(shards)}]",
            f"data.weights={weights}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=32",
            "method.proj_dim=16",
            "train.num_workers=1",
            "train.max_steps=4",
            "train.checkpoint_every=2",
            "train.keep_checkpoints=3",
            f"train.storage_path={storage_path}",
            f"train.name={name}",
            *extra,
        ],
    )


def _damage_newest_checkpoint(run: str) -> str:
    """Truncate rank 0's weights file in the run's newest checkpoint (so a resume skips it); its path."""
    from raysl.train import checkpoint, storage

    newest = os.path.join(run, storage.subdirs(run, "checkpoint_")[-1])
    with open(os.path.join(newest, checkpoint.WEIGHTS), "r+b") as f:
        f.truncate(100)
    return newest


def test_pretrain_on_a_mixture_logs_images_drawn_per_set(ray_local, mixture_sets, tmp_path):
    """A real run (Ray Train, 1 worker): drawn/<set> in metrics.jsonl follows the weights exactly,
    the run records the index file of each set it reads, and a run resumed from its step-2
    checkpoint draws the same images (same losses, same counts) as the run that went on."""
    from raysl.pretrain import pretrain
    from raysl.train import storage
    from raysl.train.metrics import read_metrics

    curated, web = mixture_sets
    cfg = _run_config([curated, web], "[0.25, 0.75]", tmp_path, "mix")
    out = pretrain(cfg)
    rows = read_metrics(out["run_dir"])
    assert [(r["step"], r["drawn/curated"], r["drawn/web"]) for r in rows] == [(s, s, 3 * s) for s in (1, 2, 3, 4)]
    with open(os.path.join(out["run_dir"], mixture.PINS)) as f:
        pinned = json.load(f)["sets"]
    assert [(s["name"], s["index"], s["share"]) for s in pinned] == [
        ("curated", "index.parquet", 1),
        ("web", "index.parquet", 3),
    ]
    # resume from the step-2 checkpoint (the step-4 one damaged, so skipped): the same batches
    run = out["run_dir"]
    assert storage.checkpoint_step(_damage_newest_checkpoint(run)) == 4
    pretrain(cfg, resume=True)
    from raysl.train import recovery

    resumed = recovery.read_attempts(run)[-1]  # the resumed attempt started after step 2, not from 0
    assert (resumed["start_step"], resumed["first_step"]) == (2, 3), resumed
    again = read_metrics(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    assert [(r["loss"], r["drawn/curated"], r["drawn/web"]) for r in again] == [
        (r["loss"], r["drawn/curated"], r["drawn/web"]) for r in rows
    ]


def test_an_opened_mixture_gives_the_same_batches_and_counts_only_what_is_taken(ray_local, mixture_sets):
    curated, web = mixture_sets
    mix = mixture.from_config(mixture_data([curated, web], [0.25, 0.75]))
    kw = dict(seed=3, epoch=1, rank=0, world_size=1)
    _, plain = _batches(mix, **kw)
    drawn = {"curated": 7, "web": 21}  # a run's counts so far
    stream = mix.batches(_rows(mix, **kw), **kw, batch_size=4, start=8, drawn=drawn)
    stream.open()
    assert drawn == {"curated": 7, "web": 21} and stream.position == 8
    assert [[str(k) for k in b["key"]] for b in stream] == plain[2:]
    assert drawn == {"curated": 7 + 11, "web": 21 + 33} and stream.position == 52


def test_views_made_on_the_worker_train_a_mixture_of_image_sizes_and_resume_exactly(ray_local, tmp_path):
    """data.augment_on=worker: the tasks send decoded pixels (32 px and 40 px images mixed
    in one batch), the training worker makes the views; a run resumed from its step-2
    checkpoint starts at step 3 and repeats the same losses and draws."""
    from raysl.data.demo_images import digit_pngs
    from raysl.pretrain import pretrain
    from raysl.train import recovery
    from raysl.train.metrics import read_metrics

    small, big = str(tmp_path / "small"), str(tmp_path / "big")
    write_shards(small, [(f"small/{i:03d}.png", png, lab) for i, (png, lab) in enumerate(digit_pngs(32, 20))], 5)
    write_shards(big, [(f"big/{i:03d}.png", png, lab) for i, (png, lab) in enumerate(digit_pngs(40, 20))], 5)
    cfg = _run_config(
        [small, big], "[0.5, 0.5]", tmp_path, "worker_views", "data.augment_on=worker", "data.image_size=24"
    )
    run = pretrain(cfg)["run_dir"]
    rows = read_metrics(run)
    assert [(r["step"], r["drawn/small"], r["drawn/big"]) for r in rows] == [(s, 2 * s, 2 * s) for s in (1, 2, 3, 4)]
    assert all(np.isfinite(r["loss"]) for r in rows)
    _damage_newest_checkpoint(run)  # the step-4 one: the resumed run starts from step 2
    pretrain(cfg, resume=True)
    resumed = recovery.read_attempts(run)[-1]
    assert (resumed["start_step"], resumed["first_step"]) == (2, 3), resumed
    assert [(r["step"], r["loss"], r["drawn/big"]) for r in read_metrics(run)] == [
        (r["step"], r["loss"], r["drawn/big"]) for r in rows
    ]
