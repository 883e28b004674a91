"""ZeRO-3 builds the method partitioned, on 2 gloo workers.

The drills run once per module in two spawned processes (tests/zero3_worker.py), through
`raysl.train.zero.build_method`, the engine, `train_step`, `checkpoint.save/load`,
`held_out_loss` and the kNN monitor's `gathered_features`; each test checks one promise
against a plain single-process build of the same method.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import zero3_worker as w

from raysl.methods.base import build_method
from raysl.train import checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("zero3"))
    mp.spawn(w.worker, args=(_free_port(), d, ["build", "train", "methods"]), nprocs=2)
    out = [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]
    for r, o in enumerate(out):
        assert "error" not in o, f"rank {r}:\n{o['error']}"
    return out, d


def _plain(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_method(w.cfg_for(name))


@pytest.mark.parametrize("name", ["byol", "dino", "mae", *w.MASKED])
def test_each_worker_holds_half_of_every_parameter_never_the_whole(drills, name):
    out, _ = drills
    whole = sum(p.numel() for p in _plain(name).parameters())
    for o in out:
        mine, seen_whole = o[f"{name}/numel"]
        assert seen_whole == whole
        assert whole / 2 <= mine <= whole / 2 + 200  # 1/world, up to padding of each partition
        assert o[f"{name}/data_numel"] == 0  # no parameter is held whole outside forward


@pytest.mark.parametrize("name", ["byol", "dino", "mae", *w.MASKED])
def test_partitioned_build_starts_from_the_weights_of_a_plain_build(drills, name):
    """timm's and the heads' initialisers run on gathered parameters (raysl.train.zero), the
    teacher starts as the student: the same initial method, bit for bit."""
    out, _ = drills
    plain = _plain(name).state_dict()
    got = out[0][f"{name}/state"]
    assert sorted(got) == sorted(plain)
    for k, v in plain.items():
        assert torch.equal(got[k], v.float()), k
    for k in got:
        if k.startswith("teacher_"):
            assert torch.equal(got[k], got[k.removeprefix("teacher_")]), k


def test_ema_update_moves_each_teacher_partition_by_the_formula(drills):
    out, _ = drills
    before, after = out[0]["ema/before"], out[0]["ema/after"]
    params = {n for n, _ in _plain("byol").named_parameters()}
    moved = 0
    for k in params:
        if k.startswith("teacher_"):
            want = 0.7 * before[k] + 0.3 * before[k.removeprefix("teacher_")]
            torch.testing.assert_close(after[k], want)
            moved += int(not torch.equal(after[k], before[k]))
        else:
            assert torch.equal(after[k], before[k])
    assert moved > 0


def test_weights_safetensors_holds_the_whole_trained_method(drills):
    from safetensors.torch import load_file

    _, d = drills
    weights = load_file(os.path.join(d, "ckpt", checkpoint.WEIGHTS))
    plain = _plain("byol")
    init = {k: v.clone() for k, v in plain.state_dict().items()}
    plain.load_state_dict(weights, strict=True)  # every key, every shape
    moved = [k for k, v in weights.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(k.startswith("teacher_") for k in moved)


def test_knn_monitor_features_are_those_of_the_whole_backbone(drills):
    """The monitor runs under ZeRO-3 (config no longer refuses eval.knn_shards with it): the
    partitioned backbone's features equal the gathered weights' in one process."""
    from safetensors.torch import load_file

    from raysl.eval.knn import extract_features

    out, d = drills
    plain = _plain("byol")
    plain.load_state_dict(load_file(os.path.join(d, "ckpt", checkpoint.WEIGHTS)))
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (10, 3, w.SIZE, w.SIZE), dtype=torch.uint8, generator=g)
    want = extract_features(plain.backbone, images, batch_size=4)
    for o in out:
        torch.testing.assert_close(o["knn_features"], want, rtol=1e-4, atol=1e-5)


def test_val_loss_is_collective_and_leaves_nothing_behind(drills):
    """Every worker gets the same value, twice (nothing it changed carries over): the mean of
    the plain method's losses on both workers' held-out views, at the weights of that step."""
    from raysl.train.build import make_schedules

    out, _ = drills
    a, b = out[0]["val_loss"], out[1]["val_loss"]
    assert a == b and a[0] == a[1]
    plain = _plain("byol")
    plain.load_state_dict(out[0]["ema/after"])  # the weights when the drill took its val_loss
    values = {**make_schedules(w.cfg_for("byol"), 10, 2).at(2), "step": 2}
    with torch.no_grad():
        losses = [float(plain([*w.views(100 + i, rank)], values)["loss"]) for rank in range(2) for i in range(2)]
    assert a[0] == pytest.approx(sum(losses) / len(losses), rel=1e-5)


def test_resume_continues_exactly(drills):
    out, _ = drills
    for o in out:
        assert o["resumed_step"] == 3
        assert o["resumed"] == o["expected"]


# Under ZeRO-3, train_step leaves an EMA teacher where it was: after one step the student
# moved as under ZeRO-0, the teacher not at all (ZeRO-0 moves it by the formula). The
# methods whose second loss depends on their teacher show it; I-JEPA's momentum of 0.996
# hides it in the loss.
EMA_TEACHER_STANDS_STILL = pytest.mark.xfail(
    strict=True, reason="ZeRO-3 train_step does not move the EMA teacher (ZeRO-0 does)"
)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("dino", marks=EMA_TEACHER_STANDS_STILL),
        "mae",
        pytest.param("ibot", marks=EMA_TEACHER_STANDS_STILL),
        pytest.param("dinov2", marks=EMA_TEACHER_STANDS_STILL),
        "ijepa",
    ],
)
def test_partitioned_training_follows_the_unpartitioned_one(drills, name):
    """Two steps under ZeRO-3 give each worker the losses the same method gives under
    ZeRO-0 from the same weights and inputs: the first checks the partitioned forward
    (to float32 rounding), the second that the partitioned gradients, optimizer step and
    EMA update moved the weights alike (AdamW's first step is the gradient's sign, so
    reductions in another order move the smallest components differently: 1e-3)."""
    out, _ = drills
    for o in out:
        partitioned, plain = o[f"{name}/losses/zero3"], o[f"{name}/losses/zero0"]
        assert partitioned[0] == pytest.approx(plain[0], rel=1e-5)
        assert partitioned[1] == pytest.approx(plain[1], rel=1e-3)


@pytest.mark.parametrize("name", w.MASKED)
def test_masked_methods_step_0_loss_is_one_process_on_the_global_batch(drills, name):
    """iBOT, DINOv2 and I-JEPA partitioned on 2 workers, each with its half of the batch and
    the masks drawn from its rows' seeds: the mean of the workers' first losses is the loss
    one plain process computes on the concatenated batch (DINOv2's Sinkhorn-Knopp and
    KoLeo, I-JEPA's token mean are over the global batch; ZeRO-3 gathers the cls/pos
    parameters the methods read outside the ViT's forward)."""
    from raysl.train.batch import Batch, forward

    out, _ = drills
    parts = [o[f"{name}/inputs"] for o in out]
    views = [torch.cat(v) for v in zip(*(p.views for p in parts))]
    masks = torch.cat([p.masks for p in parts])
    assert masks.any()
    from raysl.train.build import make_schedules

    plain = _plain(name)
    values = {**make_schedules(w.cfg_for(name), 10, 2).at(0), "step": 0}  # as the drill's first step
    with torch.no_grad():
        want = float(forward(plain, Batch(views, masks), values)["loss"])
    got = sum(o[f"{name}/losses/zero3"][0] for o in out) / len(out)
    assert got == pytest.approx(want, rel=1e-5)
