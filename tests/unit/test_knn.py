"""Weighted cosine kNN (DINO) against a plain per-sample loop, and feature extraction."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from raysl.data.views import normalize
from raysl.eval.knn import extract_features, knn_top1


def plain_knn(train, train_labels, test, test_labels, k, t, classes):
    top1 = top5 = 0
    for x, y in zip(test.tolist(), test_labels.tolist()):
        sims = []
        for f, lab in zip(train.tolist(), train_labels.tolist()):
            nx = math.sqrt(sum(a * a for a in x))
            nf = math.sqrt(sum(a * a for a in f))
            sims.append((sum(a * b for a, b in zip(x, f)) / (nx * nf), lab))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * classes
        for s, lab in sims[:k]:
            votes[lab] += math.exp(s / t)
        ranked = sorted(range(classes), key=lambda c: -votes[c])
        top1 += ranked[0] == y
        top5 += y in ranked[: min(5, classes)]
    return 100 * top1 / len(test), 100 * top5 / len(test)


@pytest.mark.parametrize("k, t, classes", [(20, 0.07, 10), (5, 0.5, 3), (1, 0.07, 7), (100, 0.1, 10)])
def test_knn_matches_a_plain_loop(k, t, classes):
    g = torch.Generator().manual_seed(k)
    centers = torch.randn(classes, 8, generator=g)
    train_labels = torch.randint(0, classes, (60,), generator=g)
    test_labels = torch.randint(0, classes, (25,), generator=g)
    train = centers[train_labels] + 0.9 * torch.randn(60, 8, generator=g)  # not normalised: knn_top1 does it
    test = centers[test_labels] + 0.9 * torch.randn(25, 8, generator=g)
    got = knn_top1(train, train_labels, test, test_labels, k=k, temperature=t, chunk=7)
    want = plain_knn(train, train_labels, test, test_labels, min(k, 60), t, classes)
    assert got == pytest.approx(want)
    assert 0 < got[0] <= got[1] <= 100


def test_knn_perfect_and_errors():
    feats = torch.eye(4)
    labels = torch.arange(4)
    assert knn_top1(feats, labels, feats, labels, k=1) == (100.0, 100.0)
    with pytest.raises(ValueError):
        knn_top1(feats, labels[:3], feats, labels)
    with pytest.raises(ValueError):
        knn_top1(feats, labels, feats, labels, temperature=0)


def test_extract_features_is_eval_normalised_and_unit_norm():
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False, num_classes=0)
    net.train()
    imgs = torch.randint(0, 256, (10, 3, 32, 32), dtype=torch.uint8)
    f = extract_features(net, imgs, batch_size=3)
    assert f.shape == (10, net.num_features)
    torch.testing.assert_close(f.norm(dim=1), torch.ones(10))
    assert net.training  # mode restored
    net.eval()
    with torch.no_grad():
        want = F.normalize(net(normalize(imgs)), dim=1)
    torch.testing.assert_close(f, want)
    with pytest.raises(ValueError, match="uint8"):
        extract_features(net, imgs.float(), 4)


def test_bench_methods_data_and_baseline(tmp_path):
    """The pieces of `raysl bench methods` short of pretraining: a disjoint seeded split of
    the real digits, a shard set the reader accepts, the random-init baseline."""
    import numpy as np

    from raysl.bench.methods import BASE, bench_overrides, digits, format_table, knn_eval, split, write_shards
    from raysl.config import load_config
    from raysl.data.schema import read_manifest
    from raysl.eval.weights import initial_backbone

    images, labels, pngs = digits(32)
    assert images.shape == (1797, 3, 32, 32) and images.dtype == np.uint8 and len(set(labels.tolist())) == 10
    train, test = split(len(labels), 1 / 3, seed=0)
    assert len(set(train) & set(test)) == 0 and len(train) + len(test) == 1797
    assert np.array_equal(split(len(labels), 1 / 3, seed=0)[1], test)
    write_shards(str(tmp_path / "s"), pngs, labels, train[:250], shard_size=100)
    assert read_manifest(str(tmp_path / "s")).rows == 250
    method, per = bench_overrides("simclr-quality")
    assert method == "simclr" and "method.quality_weighting=true" in per
    cfg = load_config("quickstart", [*BASE, *per, f"method.name={method}"])
    a, b = initial_backbone(cfg), initial_backbone(cfg)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    r = knn_eval(
        a,
        torch.from_numpy(images[train[:300]]),
        labels[train[:300]],
        torch.from_numpy(images[test[:100]]),
        labels[test[:100]],
    )
    assert 10 < r["top1"] <= 100  # random conv features are already far above chance (10%) on digits
    row = {
        "method": "simclr",
        "backbone": "test_resnet",
        "image_size": 32,
        "steps": 1,
        "wall_s": 1.0,
        "knn_top1_random": 80.0,
        "knn_top1": 85.0,
        "delta": 5.0,
        "first_loss": 5.0,
        "final_loss": 4.0,
    }
    assert "| simclr | test_resnet @32px | 1 |" in format_table([row])
