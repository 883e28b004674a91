"""`raysl bench parity`'s pieces that need no training: its data, the plain loop's schedule
and weight-decay groups against raysl's, the stream order its `order` swap replays, and
its argument errors. Its runs are measured by the command itself (benchmarks/)."""

import argparse

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch

from raysl.bench import parity
from raysl.data.schema import read_manifest, shard_paths
from raysl.errors import UserError
from raysl.optim.optimizers import param_groups


def _labels(shards):
    return [x for p in shard_paths(shards, read_manifest(shards)) for x in pq.read_table(p)["label"].to_pylist()]


def _keys(shards):
    return [x for p in shard_paths(shards, read_manifest(shards)) for x in pq.read_table(p)["image"].to_pylist()]


def test_digit_sets_are_disjoint_and_by_label_sorts_the_rows(tmp_path):
    train, test = parity.digit_sets(str(tmp_path), 60, 20, 0, "mixed")
    assert not set(_keys(train)) & set(_keys(test))
    assert len(set(_labels(train)[:20])) > 3  # mixed: any 20 rows hold several classes
    sorted_train, _ = parity.digit_sets(str(tmp_path), 60, 20, 0, "by-label")
    assert _labels(sorted_train) == sorted(_labels(train)) and sorted(_keys(sorted_train)) == sorted(_keys(train))


def test_plain_schedule_and_decay_groups_are_raysls():
    """The plain loop's lr (from the papers: warm-up from 0, cosine to min_lr on the last
    step) equals raysl's schedule step for step, and raysl decays exactly the ndim > 1
    parameters the plain loop decays."""
    recipe = parity.Recipe()
    ours = parity.raysl_schedules(recipe)
    plain = [parity.cosine_lr(s, recipe) for s in range(recipe.steps)]
    np.testing.assert_allclose(ours.lr, plain, rtol=1e-9, atol=1e-12)
    assert plain[0] == 0 and plain[recipe.warmup_steps] == recipe.peak_lr and plain[-1] == recipe.min_lr
    model = timm.create_model("test_resnet", num_classes=0)
    decay, no_decay = param_groups(model, 0.05)
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05


def test_stream_order_is_the_readers_windows(tmp_path):
    """One epoch of the stream the `order` swap replays: every row once, each run of rows
    a window of `window` shards in the reader's permuted shard order."""
    train, _ = parity.digit_sets(str(tmp_path), 2500, 10, 0, "by-label")  # 3 shards: 1000, 1000, 500
    order = parity.stream_order(train, seed=3, epoch=0, window=2)
    assert sorted(order.tolist()) == list(range(2500))
    shard_of = np.repeat([0, 1, 2], [1000, 1000, 500])[order]
    from raysl.data import reader

    mine = reader.worker_shards(read_manifest(train), seed=3, epoch=0, rank=0, world_size=1)
    first = len(shard_of) - (500 if mine[-1] == 2 else 1000)
    assert set(shard_of[:first].tolist()) == set(mine[:2]) and set(shard_of[first:].tolist()) == {mine[2]}
    batches = parity.StreamBatches(train, 128, 3, 2)
    it = iter(batches)
    first_epoch = [next(it) for _ in range(2500 // 128)]
    assert [i for b in first_epoch for i in b] == order[: 2500 // 128 * 128].tolist()
    assert next(it) == parity.stream_order(train, seed=3, epoch=1, window=2)[:128].tolist()


def test_arguments(tmp_path):
    p = argparse.ArgumentParser()
    parity.add_arguments(p)
    with pytest.raises(UserError, match="--sides plain\\+colour"):
        parity.run_from_args(p.parse_args(["--sides", "plain,plain+colour", "--out", str(tmp_path)]))
    with pytest.raises(UserError, match="both --shards"):
        parity.run_from_args(p.parse_args(["--shards", str(tmp_path), "--out", str(tmp_path)]))
    assert parity.check_sides("plain, raysl,plain+views+order") == ["plain", "raysl", "plain+views+order"]


def _png() -> bytes:
    from raysl.data.demo_images import digit_pngs

    return next(iter(digit_pngs(32)))[0]


def test_raysl_views_are_normalised_pairs():
    a, b = parity.RayslViews("simclr", 32)(_png())
    assert a.shape == b.shape == (3, 32, 32) and a.dtype == torch.float32 and not torch.equal(a, b)


@pytest.mark.parametrize("method", parity.METHODS)
def test_each_methods_plain_loss_and_raysl_config(method):
    """Each method's plain loss (lightly's parts) takes a step on the views of its lightly
    transform, and its raysl recipe is a valid config of the same method and views."""
    pytest.importorskip("lightly")
    from PIL import Image

    recipe = parity.Recipe(**{**parity.METHOD_DEFAULTS[method], "method": method, "model": "test_resnet"})
    cfg = parity.raysl_config("s", "o", "n", recipe, 0)
    assert (cfg.method.name, cfg.data.views, cfg.data.image_size) == (method, recipe.views, 32)
    torch.manual_seed(0)
    backbone, loss_fn, model = parity.lightly_method(recipe)
    transform = parity.lightly_transform(recipe)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    views = [torch.stack(v) for v in zip(*[transform(img) for _ in range(4)])]
    assert [v.shape for v in views] == [(4, 3, 32, 32)] * 2
    ours = parity.RayslViews(recipe.views, 32, 0 if method == "dino" else None)(_png())
    assert [v.shape for v in ours] == [(3, 32, 32)] * 2
    before = [p.detach().clone() for p in backbone.parameters()]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = loss_fn(views, 0)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, backbone.parameters()))


@pytest.mark.parametrize("method", ["simclr", "byol", "mocov3", "barlowtwins", "vicreg", "mocov2"])
def test_raysl_method_scores_views_as_lightlys_parts(method):
    """Built from the same seed, raysl's method module (the `method` swap) has the plain
    side's backbone weights and gives lightly's loss on the same views (BYOL: raysl's sum
    of 2 - 2 cos over both views is 4 + 4 x lightly's mean of -cos), so a head or loss that
    departs from lightly's shows here before any training."""
    pytest.importorskip("lightly")
    recipe = parity.Recipe(**{**parity.METHOD_DEFAULTS[method], "method": method, "model": "test_resnet"})
    torch.manual_seed(0)
    backbone, plain_loss, _ = parity.lightly_method(recipe)
    torch.manual_seed(0)
    ours, raysl_loss, _ = parity._raysl_method(recipe, 0)
    for a, b in zip(backbone.state_dict().values(), ours.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    views = [torch.randn(16, 3, 32, 32), torch.randn(16, 3, 32, 32)]
    expected = plain_loss(views, 0).detach()
    if method == "byol":
        expected = 4 + 4 * expected
    torch.testing.assert_close(raysl_loss(views, 0).detach(), expected, rtol=1e-5, atol=1e-5)
