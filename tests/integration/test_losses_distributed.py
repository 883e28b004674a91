"""Across workers: 2 processes on gloo, each holding half of a fixed global batch, must
reproduce one process holding the whole batch: (a) the mean of the workers' losses, (b)
the gradients after data-parallel averaging (the mean over workers of a shared layer's
gradients; for the per-sample leaf inputs, each worker's gradient of its slice divided by
the world size, as DDP's averaging scales it). Deliberately broken collectives (a plain
all_gather without gradient, a gather that keeps only the local gradient, Barlow Twins'
no-grad all_reduce) must fail the same comparison.

One spawn runs every check; the parent computes the single-process references and
compares, so failures are ordinary pytest assertions."""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raysl.methods import distributed as D
from raysl.methods import losses as L
from raysl.train.local_world import free_port

WORLD, B, N = 2, 4, 8  # local batch, global batch
D_IN, D_OUT = 6, 5
TOL = dict(rtol=1e-9, atol=1e-11)


# Each case: (number of input views, fn(zs, part, g) -> dict). zs are the worker's views
# after the shared linear layer; part(t) is this worker's equal chunk of a global tensor
# along dim 0 (the identity in the single process); g draws extra global inputs, the
# same sequence in every process. Keys "rows:*" hold per-sample outputs (concatenated
# over workers), "mean:*" are averaged over workers like the loss; other extra keys must
# be equal on every worker.
def _nt_xent(zs, part, g):
    return {"loss": L.nt_xent(zs[0], zs[1], 0.2)}


def _nt_xent_weighted(zs, part, g):
    w = torch.rand(N, generator=g, dtype=torch.float64) + 0.2
    return {"loss": L.nt_xent_weighted(zs[0], zs[1], 0.3, part(w))}


def _moco_v3(zs, part, g):
    keys = torch.randn(N, D_OUT, generator=g, dtype=torch.float64)  # momentum encoder output
    return {"loss": L.moco_v3_loss(zs[0], part(keys), 0.2) + L.moco_v3_loss(zs[1], part(keys.flip(0)), 0.2)}


def _swav(zs, part, g):
    protos = torch.nn.functional.normalize(torch.randn(7, D_OUT, generator=g, dtype=torch.float64), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(WORLD * 6, D_OUT, generator=g, dtype=torch.float64), dim=1)
    scores = [torch.nn.functional.normalize(z, dim=1) @ protos.t() for z in zs]
    loss = L.swav_loss(scores, (0, 1), 0.1, 0.05, 3, queue_scores=[part(queue) @ protos.t(), None])
    return {"loss": loss, "rows:codes": L.sinkhorn(scores[2].detach(), 0.05, 3)}


def _dino(zs, part, g):
    teacher = [torch.randn(N, D_OUT, generator=g, dtype=torch.float64) for _ in range(2)]
    center = 0.1 * torch.randn(1, D_OUT, generator=g, dtype=torch.float64)
    local = [part(t) for t in teacher]
    return {"loss": L.dino_loss(zs, local, center, 0.1, 0.04), "center": L.dino_center_update(center, local, 0.9)}


def _dinov2(zs, part, g):  # DINO loss on a Sinkhorn-Knopp teacher, plus KoLeo on the global batch
    teacher = torch.randn(2 * N, D_OUT, generator=g, dtype=torch.float64)
    local = torch.cat([part(t) for t in teacher.chunk(2)])  # each worker: its rows of both crops
    probs = list(L.sinkhorn(local, 0.07, 3).chunk(2))
    loss = L.self_distillation_loss(zs, probs, 0.1) + 0.1 * (L.koleo_loss(zs[0]) + L.koleo_loss(zs[1]))
    return {"loss": loss, "rows:probs": torch.cat(probs, dim=1)}


def _ibot_patches(zs, part, g):  # masked patches: a different number on each worker
    patch = torch.randn(3, D_OUT, generator=g, dtype=torch.float64)  # 3 patches per image
    masks = torch.rand(N, 3, generator=g) < 0.5
    masks[0], masks[N - 1] = True, False  # worker 0 and worker 1 hold different counts
    teacher = torch.randn(N, 3, D_OUT, generator=g, dtype=torch.float64)
    m = part(masks)
    student = (zs[0].unsqueeze(1) * patch)[m]
    probs = L.sinkhorn(part(teacher)[m], 0.07, 3, equal_rows=False)
    return {"loss": L.masked_patch_loss(student, probs, m, 0.1)}


def _ijepa(zs, part, g):  # smooth L1 over padded target tokens, different counts per worker
    target = torch.randn(N, 3, D_OUT, generator=g, dtype=torch.float64)
    valid = torch.rand(N, 3, generator=g) < 0.6
    valid[:, 0] = True
    valid[: N // 2] = True
    pred = torch.stack([zs[0], zs[1] * 2, zs[0] - zs[1]], dim=1)
    return {"loss": L.masked_regression_loss(pred, part(target), part(valid))}


def _barlow(zs, part, g):
    return {"loss": L.barlow_twins_loss(zs[0], zs[1], 0.0051)}


def _vicreg(zs, part, g):
    loss, terms = L.vicreg_loss(zs[0], zs[1])
    # invariance is local (its mean over workers is global); variance/covariance are global on every worker
    return {
        "loss": loss,
        "mean:invariance": terms["invariance"],
        "variance": terms["variance"],
        "covariance": terms["covariance"],
    }


CASES = {
    "nt_xent": (2, _nt_xent),
    "nt_xent_weighted": (2, _nt_xent_weighted),
    "moco_v3": (2, _moco_v3),
    "swav": (4, _swav),
    "dino": (4, _dino),
    "dinov2": (4, _dinov2),
    "ibot_patches": (1, _ibot_patches),
    "ijepa": (2, _ijepa),
    "barlow_twins": (2, _barlow),
    "vicreg": (2, _vicreg),
}


def run_case(name, rank=0, size=1):
    n_views, fn = CASES[name]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    xs = [torch.randn(N, D_IN, generator=g, dtype=torch.float64) for _ in range(n_views)]
    lin = torch.nn.Linear(D_IN, D_OUT, dtype=torch.float64)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64))
        lin.bias.copy_(torch.randn(D_OUT, generator=g, dtype=torch.float64))

    def part(t):
        return t.chunk(size)[rank]

    local = [part(x).clone().requires_grad_() for x in xs]
    out = fn([lin(x) for x in local], part, g)
    out["loss"].backward()
    return {
        **{k: v.detach() for k, v in out.items()},
        "grad:weight": lin.weight.grad,
        "grad:bias": lin.bias.grad,
        **{f"grad:x{i}": x.grad for i, x in enumerate(local)},
    }


# Broken collectives that peers have shipped: each keeps the forward exact.
def _plain_all_gather(x):  # no backward through the gather at all
    return D.gather_no_grad(x)


def _gather_local_grad_only(x):  # "put my own slice back": drops the other workers' gradients
    rank, _ = D.world()
    everything = D.gather_no_grad(x).clone()
    everything[rank * x.shape[0] : (rank + 1) * x.shape[0]] = x
    return everything


def _all_reduce_no_grad(x):  # official Barlow Twins: all_reduce(c) outside autograd -> 1/world_size
    return x + (D.all_reduce_sum(x) - x).detach()


BROKEN = {
    "nt_xent/plain_all_gather": ("nt_xent", "gather_with_grad", _plain_all_gather),
    "nt_xent/local_grad_only": ("nt_xent", "gather_with_grad", _gather_local_grad_only),
    "vicreg/plain_all_gather": ("vicreg", "gather_with_grad", _plain_all_gather),
    "barlow_twins/all_reduce_no_grad": ("barlow_twins", "all_reduce_sum_with_grad", _all_reduce_no_grad),
    "koleo/plain_all_gather": ("dinov2", "gather_with_grad", _plain_all_gather),
}


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results = {name: run_case(name, rank, WORLD) for name in CASES}
        for label, (name, attr, broken) in BROKEN.items():
            good = getattr(L, attr)
            setattr(L, attr, broken)
            try:
                results[label] = run_case(name, rank, WORLD)
            finally:
                setattr(L, attr, good)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _mismatches(workers, ref):
    """Names of the quantities where the data-parallel result differs from the reference."""
    bad = []
    for key, want in ref.items():
        parts = [w[key] for w in workers]
        if key == "loss" or key.startswith("mean:"):
            got = torch.stack(parts).mean()
        elif key in ("grad:weight", "grad:bias"):
            got = torch.stack(parts).mean(0)  # DDP/DeepSpeed average shared parameters' gradients
        elif key.startswith("grad:x"):
            got = torch.cat(parts) / len(parts)  # the same averaging applied to per-sample inputs
        elif key.startswith("rows:"):
            got = torch.cat(parts)
        else:
            if not all(torch.allclose(p, want, **TOL) for p in parts):
                bad.append(key)
            continue
        if not torch.allclose(got, want, **TOL):
            bad.append(key)
    return bad


def test_losses_match_one_process_holding_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    workers = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    refs = {name: run_case(name) for name in CASES}
    for name in CASES:
        assert _mismatches([w[name] for w in workers], refs[name]) == [], name
        assert all(w[name]["grad:weight"].abs().sum() > 0 for w in workers), name  # non-vacuous
    for label, (name, _, _) in BROKEN.items():
        bad = _mismatches([w[label] for w in workers], refs[name])
        assert "loss" not in bad, label  # the forward is right ...
        assert "grad:weight" in bad and "grad:x0" in bad, label  # ... and the comparison catches the gradients
