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
