"""Unit tier: every loss against a plain, independent implementation (loops over samples,
the papers' pseudo-code), loss and input gradients, float64, fixed seeds."""

import math

import numpy as np
import pytest
import torch

from raysl.methods import losses as L

TIGHT = dict(rtol=1e-9, atol=1e-11)


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


def check(fn, ref, *xs):
    """fn(*xs) and ref(*xs) agree in value and in the gradient of every input."""
    got, want = fn(*xs), ref(*xs)
    assert torch.allclose(got, want, **TIGHT), (float(got), float(want))
    for a, b in zip(grads(got, *xs), grads(want, *xs)):
        if a is None or b is None:
            assert a is None and b is None
        else:
            assert torch.allclose(a, b, **TIGHT)


def unit(v):
    return v / torch.sqrt((v * v).sum())


def cos(a, b):
    return (unit(a) * unit(b)).sum()


# ------------------------------------------------------------------ plain references


def ref_nt_xent(z1, z2, t, w=None):
    z = [unit(v) for v in torch.cat([z1, z2])]
    n = z1.shape[0]
    w = torch.ones(n, dtype=z1.dtype) if w is None else w / w.mean()
    total, weight = 0.0, 0.0
    for i in range(2 * n):
        j = i + n if i < n else i - n
        denom = sum(torch.exp((z[i] * z[m]).sum() / t) for m in range(2 * n) if m != i)
        total = total + w[i % n] * -torch.log(torch.exp((z[i] * z[j]).sum() / t) / denom)
        weight = weight + w[i % n]
    return total / weight


def ref_info_nce_queue(q, k, queue, t):
    loss = 0.0
    for i in range(q.shape[0]):
        pos = torch.exp(cos(q[i], k[i]) / t)
        neg = sum(torch.exp(cos(q[i], queue[j]) / t) for j in range(queue.shape[0]))
        loss = loss - torch.log(pos / (pos + neg))
    return loss / q.shape[0]


def ref_moco_v3(q, k, t):
    k = k.detach()
    loss = 0.0
    for i in range(q.shape[0]):
        denom = sum(torch.exp(cos(q[i], k[j]) / t) for j in range(k.shape[0]))
        loss = loss - torch.log(torch.exp(cos(q[i], k[i]) / t) / denom)
    return loss / q.shape[0] * 2 * t


def ref_byol(p, z):
    return sum(2 - 2 * cos(p[i], z[i].detach()) for i in range(p.shape[0])) / p.shape[0]


def ref_sinkhorn(scores, eps, iters):
    """SwAV paper, Algorithm 1 (numpy, float64)."""
    Q = np.exp(scores / eps).T
    Q /= Q.sum()
    K, B = Q.shape
    r, c = np.ones(K) / K, np.ones(B) / B
    for _ in range(iters):
        u = Q.sum(axis=1)
        Q *= (r / u)[:, None]
        Q *= (c / Q.sum(axis=0))[None, :]
    return (Q / Q.sum(axis=0, keepdims=True)).T


def ref_swav(scores, crops, t, eps, iters, queues=None):
    b, n = scores[0].shape[0], len(scores)
    total = 0.0
    for i, crop in enumerate(crops):
        out = scores[crop].detach().numpy()
        if queues and queues[i] is not None:
            out = np.concatenate([queues[i].numpy(), out])
        codes = torch.from_numpy(ref_sinkhorn(out, eps, iters)[-b:].copy())
        sub = 0.0
        for v in range(n):
            if v == crop:
                continue
            for r in range(b):
                logp = scores[v][r] / t - torch.logsumexp(scores[v][r] / t, 0)
                sub = sub - (codes[r] * logp).sum() / b
        total = total + sub / (n - 1)
    return total / len(crops)


def ref_dino(student, teacher, center, ts, tt):
    total, pairs = 0.0, 0
    for i, tcrop in enumerate(teacher):
        for v, scrop in enumerate(student):
            if v == i:
                continue
            for r in range(scrop.shape[0]):
                e = torch.exp((tcrop[r].detach() - center) / tt)
                p_t = e / e.sum()
                log_s = scrop[r] / ts - torch.log(torch.exp(scrop[r] / ts).sum())
                total = total - (p_t * log_s).sum() / scrop.shape[0]
            pairs += 1
    return total / pairs


def ref_barlow(z1, z2, lambd):
    n, d = z1.shape

    def bn(z):
        cols = []
        for j in range(d):
            mu = sum(z[b, j] for b in range(n)) / n
            var = sum((z[b, j] - mu) ** 2 for b in range(n)) / n
            cols.append((z[:, j] - mu) / torch.sqrt(var + 1e-5))
        return torch.stack(cols, 1)

    a, b_ = bn(z1), bn(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[r, i] * b_[r, j] for r in range(n)) / n
            loss = loss + ((1 - c) ** 2 if i == j else lambd * c**2)
    return loss


def ref_vicreg(z1, z2, sim, std, covc):
    n, d = z1.shape
    inv = sum(((z1[i] - z2[i]) ** 2).sum() for i in range(n)) / (n * d)

    def var_cov(z):
        zc = z - z.mean(0)
        v = sum(torch.relu(1 - torch.sqrt((zc[:, j] ** 2).sum() / (n - 1) + 1e-4)) for j in range(d)) / d
        c = sum(((zc[:, i] * zc[:, j]).sum() / (n - 1)) ** 2 for i in range(d) for j in range(d) if i != j) / d
        return v, c

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    var, cov = (v1 + v2) / 2, c1 + c2
    return sim * inv + std * var + covc * cov, {"invariance": inv, "variance": var, "covariance": cov}


def ref_mae(pred, target, mask, norm_pix):
    b, l, d = pred.shape
    total, count = 0.0, 0.0
    for i in range(b):
        for j in range(l):
            t = target[i, j]
            if norm_pix:
                mu = t.sum() / d
                var = ((t - mu) ** 2).sum() / (d - 1)
                t = (t - mu) / math.sqrt(float(var) + 1e-6)
            total = total + mask[i, j] * ((pred[i, j] - t) ** 2).sum() / d
            count += float(mask[i, j])
    return total / count


# ------------------------------------------------------------------ value + gradient


def test_nt_xent_matches_plain_loops():
    check(
        lambda a, b: L.nt_xent(a, b, 0.2), lambda a, b: ref_nt_xent(a, b, 0.2), rand(6, 5, seed=1), rand(6, 5, seed=2)
    )


def test_nt_xent_weighted_matches_plain_loops_and_reduces_to_nt_xent():
    w = torch.rand(6, generator=torch.Generator().manual_seed(3), dtype=torch.float64) + 0.1
    z1, z2 = rand(6, 5, seed=1), rand(6, 5, seed=2)
    check(lambda a, b: L.nt_xent_weighted(a, b, 0.3, w), lambda a, b: ref_nt_xent(a, b, 0.3, w), z1, z2)
    assert torch.allclose(L.nt_xent_weighted(z1, z2, 0.3, w), L.nt_xent_weighted(z1, z2, 0.3, 7 * w), **TIGHT)
    assert torch.allclose(
        L.nt_xent_weighted(z1, z2, 0.3, torch.ones(6, dtype=torch.float64)), L.nt_xent(z1, z2, 0.3), **TIGHT
    )


def test_info_nce_queue_matches_plain_loops():
    k, queue = rand(4, 5, seed=2, grad=False), rand(7, 5, seed=3, grad=False)
    check(
        lambda q: L.info_nce_queue(q, k, queue, 0.2), lambda q: ref_info_nce_queue(q, k, queue, 0.2), rand(4, 5, seed=1)
    )


def test_moco_v3_matches_plain_loops():
    k = rand(5, 4, seed=2)
    check(lambda q: L.moco_v3_loss(q, k, 0.2), lambda q: ref_moco_v3(q, k, 0.2), rand(5, 4, seed=1))
    assert L.moco_v3_loss(rand(5, 4, seed=1), k, 0.2).grad_fn is not None
    q = rand(5, 4, seed=1)
    L.moco_v3_loss(q, k, 0.2).backward()
    assert k.grad is None  # keys come from the momentum encoder: no gradient


def test_byol_matches_plain_loops_and_stops_target_gradient():
    p, z = rand(5, 4, seed=1), rand(5, 4, seed=2)
    check(L.byol_loss, ref_byol, p, z)
    assert float(L.byol_loss(p, p.detach()).detach()) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("eps,iters", [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_sinkhorn_matches_swav_paper_algorithm(eps, iters):
    scores = (
        torch.nn.functional.normalize(rand(12, 5, seed=4, grad=False), dim=1)
        @ torch.nn.functional.normalize(rand(7, 5, seed=5, grad=False), dim=1).t()
    )
    got = L.sinkhorn(scores, eps, iters)
    assert torch.allclose(got, torch.from_numpy(ref_sinkhorn(scores.numpy(), eps, iters)), **TIGHT)
    assert torch.allclose(got.sum(1), torch.ones(12, dtype=torch.float64), **TIGHT)


def test_sinkhorn_does_not_overflow_in_float32():
    scores = 5 + 0.1 * rand(8, 4, seed=6, grad=False)  # exp(scores / 0.05) > float32 max
    got = L.sinkhorn(scores.float(), eps=0.05)
    want = torch.from_numpy(ref_sinkhorn(scores.float().double().numpy(), 0.05, 3))
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-6)


def test_swav_matches_plain_loops():
    views = [rand(6, 4, seed=s) for s in range(4)]
    check(
        lambda *v: L.swav_loss(list(v), (0, 1), 0.1, 0.05, 3),
        lambda *v: ref_swav(list(v), (0, 1), 0.1, 0.05, 3),
        *views,
    )


def test_swav_with_queue_matches_plain_loops():
    views = [rand(6, 4, seed=s) for s in range(3)]
    queues = [rand(10, 4, seed=9, grad=False), None]
    check(
        lambda *v: L.swav_loss(list(v), (0, 1), 0.2, 0.1, 3, queue_scores=queues),
        lambda *v: ref_swav(list(v), (0, 1), 0.2, 0.1, 3, queues),
        *views,
    )


def test_dino_matches_plain_loops():
    student = [rand(4, 6, seed=s) for s in range(4)]
    teacher = [rand(4, 6, seed=10 + s, grad=False) for s in range(2)]
    center = rand(1, 6, seed=20, grad=False)[0] * 0.1
    check(
        lambda *s: L.dino_loss(list(s), teacher, center, 0.1, 0.04),
        lambda *s: ref_dino(list(s), teacher, center, 0.1, 0.04),
        *student,
    )


def test_dino_teacher_gets_no_gradient():
    teacher = [rand(4, 6, seed=10 + s) for s in range(2)]
    student = [rand(4, 6, seed=s) for s in range(3)]
    L.dino_loss(student, teacher, torch.zeros(6, dtype=torch.float64), 0.1, 0.04).backward()
    assert all(t.grad is None for t in teacher) and all(s.grad is not None for s in student)


def test_dino_center_update_is_ema_of_the_batch_mean():
    teacher = [rand(4, 6, seed=10 + s, grad=False) for s in range(2)]
    center = rand(1, 6, seed=3, grad=False)
    rows = [teacher[c][r] for c in range(2) for r in range(4)]
    want = center * 0.9 + sum(rows) / len(rows) * 0.1
    got = L.dino_center_update(center, teacher, 0.9)
    assert got.shape == (1, 6) and torch.allclose(got, want, **TIGHT)
    assert L.dino_center_update(center[0], teacher, 0.9).shape == (6,)


def test_barlow_twins_matches_plain_loops():
    check(
        lambda a, b: L.barlow_twins_loss(a, b, 0.0051),
        lambda a, b: ref_barlow(a, b, 0.0051),
        rand(7, 4, seed=1),
        rand(7, 4, seed=2),
    )


def test_vicreg_matches_plain_loops():
    z1, z2 = rand(7, 4, seed=1) * 0.5, rand(7, 4, seed=2) * 2  # some dims below std 1, some above
    check(lambda a, b: L.vicreg_loss(a, b)[0], lambda a, b: ref_vicreg(a, b, 25.0, 25.0, 1.0)[0], z1, z2)
    _, got = L.vicreg_loss(z1, z2, 1.0, 2.0, 3.0)
    _, want = ref_vicreg(z1, z2, 1.0, 2.0, 3.0)
    assert set(got) == {"invariance", "variance", "covariance"}
    assert all(torch.allclose(got[k], want[k], **TIGHT) for k in want)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_mae_matches_plain_loops(norm_pix):
    target = rand(3, 5, 12, seed=2, grad=False)
    mask = (torch.rand(3, 5, generator=torch.Generator().manual_seed(4)) < 0.6).double()
    check(
        lambda p: L.mae_loss(p, target, mask, norm_pix),
        lambda p: ref_mae(p, target, mask, norm_pix),
        rand(3, 5, 12, seed=1),
    )


# ------------------------------------------------------------------ FT (Zhu et al. 2021)


def test_feature_transform_follows_the_published_formulas():
    q, k, n = rand(4, 6, seed=1), rand(4, 6, seed=2, grad=False), rand(9, 6, seed=3, grad=False)
    qt, kt, nt = L.feature_transform(q, k, n, generator=torch.Generator().manual_seed(0))
    qn, kn, nn_ = (torch.nn.functional.normalize(t.detach(), dim=1) for t in (q, k, n))
    # positive extrapolation: q' - q = (lam - 1)(q - k) and k' - k = (lam - 1)(k - q), one lam in [1, 2]
    lam = float(((qt.detach() - qn) / (qn - kn)).mean()) + 1
    assert 1.0 <= lam <= 2.0
    assert torch.allclose(qt, lam * qn + (1 - lam) * kn, atol=1e-10)
    assert torch.allclose(kt, lam * kn + (1 - lam) * qn, atol=1e-10)
    assert ((qt * kt).sum(1) <= (qn * kn).sum(1) + 1e-12).all()  # harder positives
    # negative interpolation: every n'_j = lam n_j + (1 - lam) n_pi(j), one lam in [0, 1], pi a permutation
    partners, lams = [], []
    for j in range(9):
        for m in range(9):
            d = nn_[m] - nn_[j]
            if m != j:
                t = float((nt[j] - nn_[j]) @ d / (d @ d))
                if torch.allclose(nt[j], nn_[j] + t * d, atol=1e-10):
                    partners.append(m)
                    lams.append(1 - t)
                    break
        else:
            partners.append(j)  # mixed with itself
    assert sorted(partners) == list(range(9))
    assert np.allclose(lams, lams[0]) and 0 <= lams[0] <= 1
    assert nt.grad_fn is None and qt.requires_grad and kt.requires_grad


def test_feature_transform_sampling_and_options():
    q, k, n = rand(4, 6, seed=1, grad=False), rand(4, 6, seed=2, grad=False), rand(9, 6, seed=3, grad=False)
    a = L.feature_transform(q, k, n, generator=torch.Generator().manual_seed(5))
    b = L.feature_transform(q, k, n, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    qt, kt, nt = L.feature_transform(q, k, n, extrapolate=None, interpolate=None)
    assert torch.allclose(qt, torch.nn.functional.normalize(q, dim=1)) and torch.allclose(
        nt, torch.nn.functional.normalize(n, dim=1)
    )
    # lam_ex - 1 ~ Beta(2, 2): mean 1/2, variance 1/20
    g = torch.Generator().manual_seed(1)
    qn, kn = (torch.nn.functional.normalize(t, dim=1) for t in (q, k))
    lams = [float(((L.feature_transform(q, k, n, generator=g)[0] - qn) / (qn - kn)).mean()) for _ in range(400)]
    assert abs(np.mean(lams) - 0.5) < 0.04 and abs(np.var(lams) - 0.05) < 0.015 and min(lams) >= 0 and max(lams) <= 1


def test_feature_transform_feeds_info_nce_queue():
    q, k, n = rand(4, 6, seed=1), rand(4, 6, seed=2, grad=False), rand(9, 6, seed=3, grad=False)
    qt, kt, nt = L.feature_transform(q, k, n, extrapolate=None, interpolate=None)
    assert torch.allclose(L.info_nce_queue(qt, kt, nt, 0.2, normalize=False), L.info_nce_queue(q, k, n, 0.2), **TIGHT)
    loss = L.info_nce_queue(*L.feature_transform(q, k, n), 0.2, normalize=False)
    loss.backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_pos_neg_scores_are_cosines():
    q, k, n = rand(3, 5, seed=1), rand(3, 5, seed=2), rand(4, 5, seed=3)
    pos, neg = L.pos_neg_scores(q, k, n)
    assert pos.shape == (3,) and neg.shape == (12,)
    assert torch.allclose(pos, torch.stack([cos(q[i], k[i]) for i in range(3)]).detach(), **TIGHT)
    assert torch.allclose(neg, torch.stack([cos(q[i], n[j]) for i in range(3) for j in range(4)]).detach(), **TIGHT)


# ------------------------------------------------------------------ precision and edge cases


def test_half_precision_inputs_are_computed_in_float32():
    z1, z2 = rand(6, 5, seed=1, grad=False), rand(6, 5, seed=2, grad=False)
    for fn in (
        lambda a, b: L.nt_xent(a, b, 0.1),
        L.barlow_twins_loss,
        lambda a, b: L.vicreg_loss(a, b)[0],
        L.byol_loss,
    ):
        got = fn(z1.bfloat16(), z2.bfloat16())
        assert got.dtype == torch.float32
        assert torch.allclose(got.double(), fn(z1.bfloat16().double(), z2.bfloat16().double()), rtol=1e-4, atol=1e-4)
    assert L.sinkhorn(z1.bfloat16()).dtype == torch.float32


def test_temperatures_must_be_positive():
    z = rand(4, 3, seed=1, grad=False)
    w = torch.ones(4, dtype=torch.float64)
    for bad in (0.0, -0.1, float("nan")):
        for call in (
            lambda: L.nt_xent(z, z, bad),
            lambda: L.nt_xent_weighted(z, z, bad, w),
            lambda: L.info_nce_queue(z, z, z, bad),
            lambda: L.moco_v3_loss(z, z, bad),
            lambda: L.sinkhorn(z, eps=bad),
            lambda: L.swav_loss([z, z], temperature=bad),
            lambda: L.swav_loss([z, z], eps=bad),
            lambda: L.dino_loss([z, z], [z], z[0], bad, 0.04),
            lambda: L.dino_loss([z, z], [z], z[0], 0.1, bad),
            lambda: L.feature_transform(z, z, z, extrapolate=bad),
        ):
            with pytest.raises(ValueError, match="must be > 0"):
                call()


def test_shape_mismatches_are_clear_errors():
    a, b = rand(4, 3, seed=1, grad=False), rand(5, 3, seed=2, grad=False)
    for call, match in (
        (lambda: L.nt_xent(a, b, 0.1), "same shape"),
        (lambda: L.nt_xent_weighted(a, a, 0.1, torch.ones(3)), "one per pair"),
        (lambda: L.info_nce_queue(a, a, torch.ones(7, 4), 0.1), r"queue must have shape \(K, 3\)"),
        (lambda: L.moco_v3_loss(a, b, 0.1), "same shape"),
        (lambda: L.byol_loss(a, b), "same shape"),
        (lambda: L.swav_loss([a, b]), "same shape"),
        (lambda: L.swav_loss([a]), "at least 2 views"),
        (lambda: L.swav_loss([a, a], queue_scores=[None]), "one entry per assign crop"),
        (lambda: L.dino_loss([a, b], [a], a[0], 0.1, 0.04), "same shape"),
        (lambda: L.dino_loss([a], [a], a[0], 0.1, 0.04), ">= 2 student crops"),
        (lambda: L.dino_center_update(torch.zeros(4), [a], 0.9), "center has 4 dims"),
        (lambda: L.dino_center_update(torch.zeros(3), [a], 1.5), "momentum"),
        (lambda: L.barlow_twins_loss(a, b), "same shape"),
        (lambda: L.vicreg_loss(a, b), "same shape"),
        (lambda: L.barlow_twins_loss(a[0], a[0]), "2-D"),
        (lambda: L.mae_loss(torch.ones(2, 3, 4), torch.ones(2, 3, 5), torch.ones(2, 3)), "same shape"),
        (lambda: L.mae_loss(torch.ones(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 4)), "mask must have shape"),
        (lambda: L.feature_transform(a, a, torch.ones(7, 4)), r"negatives must have shape \(N, 3\)"),
        (lambda: L.sinkhorn(a, iters=0), "iters"),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_simsiam_loss_matches_the_papers_pseudocode_and_stops_the_gradient():
    from raysl.methods.simsiam import simsiam_loss

    g = torch.Generator().manual_seed(3)
    p, z = torch.randn(6, 8, generator=g, requires_grad=True), torch.randn(6, 8, generator=g, requires_grad=True)
    # Algorithm 1 of the paper: D(p, z) = -(normalize(p) * normalize(z.detach())).sum(dim=1).mean()
    plain = -(p / p.norm(dim=1, keepdim=True) * (z / z.norm(dim=1, keepdim=True)).detach()).sum(dim=1).mean()
    loss = simsiam_loss(p, z)
    assert torch.allclose(loss, plain, atol=1e-6)
    loss.backward()
    assert p.grad is not None and z.grad is None  # no gradient through the projection side


# ------------------------------------------------------------------ iBOT, DINOv2, I-JEPA


def ref_sinkhorn_knopp_teacher(logits, temp, iters):
    """DINOv2's SinkhornKnoppTeacher.sinkhorn_knopp_teacher, one process, plain torch."""
    Q = torch.exp(logits / temp).t()
    K, B = Q.shape
    Q = Q / Q.sum()
    for _ in range(iters):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def test_dinov2_teacher_is_sinkhorn_knopp_at_the_teacher_temperature():
    logits = rand(10, 7, seed=5, grad=False)
    want = ref_sinkhorn_knopp_teacher(logits, 0.07, 3)
    got = L.sinkhorn(logits, 0.07, 3)
    assert torch.allclose(got, want, **TIGHT)
    assert torch.allclose(L.sinkhorn(logits, 0.07, 3, equal_rows=False), want, **TIGHT)
    assert torch.allclose(got.sum(1), torch.ones(10, dtype=torch.float64), **TIGHT)  # a distribution per row
    assert L.sinkhorn(logits[:0], 0.07, 3, equal_rows=False).shape == (0, 7)  # a worker with no masked patch


def test_self_distillation_loss_with_sinkhorn_teacher_matches_plain_loops():
    student = [rand(4, 6, seed=s) for s in range(4)]
    teacher = rand(8, 6, seed=30, grad=False)
    probs = list(L.sinkhorn(teacher, 0.05, 3).chunk(2))

    def ref(*s):  # ref_dino with the teacher's softmax replaced by the Sinkhorn-Knopp rows
        total, pairs = 0.0, 0
        for i, p in enumerate(probs):
            for v, scrop in enumerate(s):
                if v != i:
                    log_s = torch.log_softmax(scrop / 0.1, dim=1)
                    total, pairs = total - sum((p[r] * log_s[r]).sum() for r in range(4)) / 4, pairs + 1
        return total / pairs

    check(lambda *s: L.self_distillation_loss(list(s), probs, 0.1), ref, *student)
    center = rand(1, 6, seed=20, grad=False) * 0.1  # DINO = the same loss with its centred softmax teacher
    soft = [torch.softmax((t - center) / 0.04, dim=1) for t in teacher.chunk(2)]
    assert torch.allclose(
        L.dino_loss(student, list(teacher.chunk(2)), center, 0.1, 0.04),
        L.self_distillation_loss(student, soft, 0.1),
        **TIGHT,
    )


def test_masked_patch_loss_matches_ibot_per_image_means():
    masks = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0]], dtype=torch.bool)  # image 1: none
    m = int(masks.sum())
    teacher = torch.softmax(rand(m, 6, seed=9, grad=False) / 0.07, dim=1)

    def ref(student):
        total, row = 0.0, 0
        for image in masks:
            terms = []
            for masked in image:
                if masked:
                    terms.append(-(teacher[row] * torch.log_softmax(student[row] / 0.1, dim=0)).sum())
                    row += 1
            total = total + (sum(terms) / len(terms) if terms else 0.0)
        return total / masks.shape[0]  # images without a masked patch count 0, as iBOT/DINOv2

    check(lambda s: L.masked_patch_loss(s, teacher, masks, 0.1), ref, rand(m, 6, seed=3))
    with pytest.raises(ValueError, match="one True per student row"):
        L.masked_patch_loss(rand(m + 1, 6), torch.cat([teacher, teacher[:1]]), masks, 0.1)


def test_koleo_matches_dinov2_koleo_loss():
    def ref(x):  # DINOv2 KoLeoLoss: normalise, nearest neighbour by dot product, -mean log distance
        xn = [x[i] / torch.sqrt((x[i] * x[i]).sum()).clamp_min(1e-8) for i in range(x.shape[0])]
        total = 0.0
        for i, a in enumerate(xn):
            j = max((k for k in range(len(xn)) if k != i), key=lambda k: float((a * xn[k]).sum().detach()))
            total = total - torch.log(torch.sqrt(((a - xn[j] + 1e-8) ** 2).sum()) + 1e-8)
        return total / len(xn)

    check(L.koleo_loss, ref, rand(9, 5, seed=4))
    spread, bunched = rand(16, 8, seed=1, grad=False), rand(16, 8, seed=1, grad=False) * 0.05 + 1.0
    assert float(L.koleo_loss(spread)) < float(L.koleo_loss(bunched))  # KoLeo rewards spread-out features


def test_masked_regression_loss_is_smooth_l1_over_valid_tokens():
    valid = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    target = rand(2, 3, 4, seed=8, grad=False) * 2  # some |differences| above 1: both branches of smooth L1

    def ref(pred):
        terms = []
        for b in range(2):
            for t in range(3):
                if valid[b, t]:
                    for d in range(4):
                        diff = (pred[b, t, d] - target[b, t, d]).abs()
                        terms.append(0.5 * diff**2 if diff < 1 else diff - 0.5)
        return sum(terms) / len(terms)

    check(lambda p: L.masked_regression_loss(p, target, valid), ref, rand(2, 3, 4, seed=2))
