"""Mixtures of shard sets (data.shards as a list, data.weights) without Ray: rows per round,
plans, epoch ends, images drawn per set, the model card's lineage, and bad input as one
error naming the key."""

import os

import numpy as np
import pytest
import torch
from shardfactory import mixture_data

from raysl.config import load_config
from raysl.data import mixture, reader
from raysl.data.schema import read_manifest
from raysl.errors import UserError


@pytest.mark.parametrize(
    "weights, want",
    [([0.3, 0.7], [3, 7]), ([1, 1, 1], [1, 1, 1]), ([0.25, 0.75], [1, 3]), ([2, 0], [1, 0]), ([1, 2000], [1, 999])],
)
def test_weights_become_rows_per_round(weights, want):
    assert mixture.shares(weights) == want


def test_a_round_interleaves_evenly_and_consumed_is_exact():
    mix = mixture.Mixture([mixture.ShardSet(f"/s{i}", f"s{i}", n) for i, n in enumerate([3, 7, 2])])
    assert mix.round == 12 and np.bincount(mix.order).tolist() == [3, 7, 2]
    # no set bunches up: in any 4 consecutive positions of the repeated round, the 7-share set has 2 or 3
    order = np.tile(mix.order, 3)
    assert all(2 <= (order[p : p + 4] == 1).sum() <= 3 for p in range(len(order) - 4))
    stream = mix.sources(0, 100)
    for p in range(101):  # the closed formula is the count of each set among the first p positions
        assert mix.consumed(p).tolist() == np.bincount(stream[:p], minlength=3).tolist()
    assert mix.sources(37, 10).tolist() == stream[37:47].tolist()


def test_a_single_string_is_one_set_planned_as_before(mixture_sets):
    curated, _ = mixture_sets
    mix = mixture.from_config(mixture_data(curated))
    assert mix.single and mix.sets[0].path == curated
    m = read_manifest(curated)
    for epoch in range(3):
        assert mix.steps_per_epoch(batch_size=3, seed=1, epoch=epoch, world_size=2) == reader.steps_per_epoch(
            m, batch_size=3, seed=1, epoch=epoch, world_size=2
        )
    assert mixture.from_config(mixture_data([curated], [0.4])).single


def test_an_epoch_ends_when_the_first_set_runs_out(mixture_sets):
    curated, web = mixture_sets
    mix = mixture.from_config(mixture_data([curated, web], [1, 3]))
    assert [s.name for s in mix.sets] == ["curated", "web"] and mix.shares.tolist() == [1, 3]
    for world, epoch in [(1, 0), (2, 0), (2, 1), (4, 2)]:
        kw = dict(seed=5, epoch=epoch, world_size=world)
        c = np.array(reader.rows_per_worker(read_manifest(curated), **kw))
        w = np.array(reader.rows_per_worker(read_manifest(web), **kw))
        want = np.minimum(c // 1, w // 3) * 4  # whole rounds of 1 + 3 rows
        assert mix.rows_per_worker(**kw).tolist() == want.tolist()
        assert mix.steps_per_epoch(batch_size=4, **kw) == want.min() // 4
    # one set 2x the other's rows at weight 3x: the web set (40 rows) runs out first, 13 rounds
    assert mix.rows_per_worker(seed=0, epoch=0, world_size=1).tolist() == [52]


def test_drawn_per_set_in_the_metrics():
    from raysl.train.metrics import global_metrics

    state = {"step": 3, "epoch": 0, "skipped": 1}
    values = {"lr": 0.1, "weight_decay": 0.0}
    one = global_metrics({"loss": torch.tensor(2.0)}, state, 0, values, 1.0, drawn={})
    assert not any(k.startswith("drawn/") for k in one)  # one set: the metrics of before
    two = global_metrics({"loss": torch.tensor(2.0)}, state, 1, values, 1.0, drawn={"web": 9, "curated": 3})
    assert (two["drawn/curated"], two["drawn/web"], two["skipped_corrupt"], two["loss"]) == (3, 9, 2, 2.0)


@pytest.mark.parametrize(
    "shards, weights, match",
    [
        ("LIST", [0.3], r"config key data.weights: 1 weight\(s\) for 2 shard set\(s\)"),
        ("LIST", [], r"config key data.weights: data.shards lists 2 sets; give one weight per set"),
        ("LIST", [0.0, 0.0], r"config key data.weights: all weights are 0"),
        ("LIST", [-1.0, 2.0], r"config key data.weights: -1.0 is not a weight"),
        ("LIST", [float("nan"), 1.0], r"config key data.weights: nan is not a weight"),
        ("ONE", [0.5, 0.5], r"config key data.weights: 2 weight\(s\) for 1 shard set\(s\)"),
        ("MISSING", [1, 1], r"config key data.shards\[1\]: .*nope: no manifest.json here"),
        ("TWICE", [1, 1], r"config key data.shards: .*curated is listed twice"),
        ("EMPTY", [], r"config key data.shards is empty"),
    ],
)
def test_bad_mixtures_are_one_error_naming_the_key(mixture_sets, tmp_path, shards, weights, match):
    curated, web = mixture_sets
    value = {
        "LIST": [curated, web],
        "ONE": curated,
        "MISSING": [curated, str(tmp_path / "nope")],
        "TWICE": [curated, curated],
        "EMPTY": "",
    }[shards]
    with pytest.raises(UserError, match=match) as err:
        mixture.from_config(mixture_data(value, weights))
    assert "\n" not in str(err.value)


def test_config_keys_and_validation_before_ray(mixture_sets, tmp_path):
    from raysl.pretrain import validate

    curated, web = mixture_sets
    cfg = load_config("quickstart", [f"data.shards=[{curated}, {web}]", "data.weights=[0.3, 0.7]"])
    assert cfg.data.shards == [curated, web] and cfg.data.weights == [0.3, 0.7]
    assert load_config("quickstart", [f"data.shards={curated}"]).data.shards == curated  # a string stays one
    with pytest.raises(UserError, match=r"config key data.weights: -1.0 is out of range"):
        load_config("quickstart", [f"data.shards=[{curated}, {web}]", "data.weights=[-1, 2]"])
    with pytest.raises(UserError, match=r"config key data.shards: expected a string, got 3"):
        load_config("quickstart", [f"data.shards=[{curated}, 3]"])
    bad = load_config("quickstart", [f"data.shards=[{curated}, {web}]", "data.weights=[1]"])
    with pytest.raises(UserError, match="config key data.weights"):
        validate(bad)
    os.chdir(tmp_path)  # a relative set in a list is made absolute like a single one
    os.makedirs("rel", exist_ok=True)
    assert load_config("quickstart", ["data.shards=[rel, s3://b/web]"]).data.shards == [
        str(tmp_path / "rel"),
        "s3://b/web",
    ]


def test_model_card_lineage_lists_every_set_of_a_mixture(mixture_sets, tmp_path):
    from raysl.eval.model_card import lineage

    curated, web = mixture_sets
    data = lineage([curated, web], str(tmp_path))
    assert data["rows"] == data["written"] == 60 and data["shards"] == f"{curated}, {web}"
    assert len((tmp_path / "ATTRIBUTIONS.csv").read_text().strip().splitlines()) == 61  # header + 60 rows
