"""ZeRO-3 builds the method partitioned, on 2 gloo workers.

The drills run once per module in two spawned processes (tests/zero3_worker.py), through
`raysl.train.zero.build_method`, the engine, `train_step`, `checkpoint.save/load`,
`held_out_loss` and the kNN monitor's `gathered_features`; each test checks one promise
against a plain single-process build of the same method.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp
import zero3_worker as w

from raysl.methods.base import build_method
from raysl.train import checkpoint
from raysl.train.local_world import free_port


@pytest.fixture(scope="module")
def drills(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("zero3"))
    mp.spawn(w.worker, args=(free_port(), d, ["build", "train", "methods"]), nprocs=2)
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


def _assert_teacher_moved_by_the_formula(before, after, momentum):
    params = {n for n, _ in _plain("byol").named_parameters()}
    moved = 0
    for k in params:
        if k.startswith("teacher_"):
            want = momentum * before[k] + (1 - momentum) * after[k.removeprefix("teacher_")]
            torch.testing.assert_close(after[k], want)
            moved += int(not torch.equal(after[k], before[k]))
    assert moved > 0


def test_ema_update_moves_each_teacher_partition_by_the_formula(drills):
    """`after_step` by hand after the optimizer step, the students gathered in between: the
    teachers (held whole since the step) move as their partitions do."""
    out, _ = drills
    before, after = out[0]["ema/before"], out[0]["ema/after"]
    _assert_teacher_moved_by_the_formula(before, after, 0.7)
    for k, _ in _plain("byol").named_parameters():
        if not k.startswith("teacher_"):
            assert torch.equal(after[k], before[k]), k


def test_train_step_moves_the_teacher_by_the_formula(drills):
    """One `train_step` as the training loop takes it, nothing gathered between the optimizer
    step and the EMA update: teacher = m * teacher + (1 - m) * the stepped student."""
    from raysl.train.build import make_schedules

    out, _ = drills
    momentum = make_schedules(w.cfg_for("byol"), 10, 2).at(3)["ema_momentum"]
    _assert_teacher_moved_by_the_formula(out[0]["train_step/before"], out[0]["train_step/after"], momentum)


def test_weights_safetensors_holds_the_whole_trained_method(drills):
    """Saved right after a train_step: every key, the teachers as that step's EMA moved them."""
    from safetensors.torch import load_file

    out, d = drills
    weights = load_file(os.path.join(d, "ckpt", checkpoint.WEIGHTS))
    plain = _plain("byol")
    plain.load_state_dict(weights, strict=True)  # every key, every shape
    saved = out[0]["train_step/after"]
    assert sorted(weights) == sorted(saved)
    for k, v in weights.items():
        assert torch.equal(v, saved[k]), k


def test_knn_monitor_features_are_those_of_the_whole_backbone(drills):
    """The monitor runs under ZeRO-3 (config no longer refuses eval.knn_shards with it): the
    partitioned backbone's features equal the gathered weights' in one process."""
    from raysl.eval.knn import extract_features

    out, _ = drills
    plain = _plain("byol")
    plain.load_state_dict(out[0]["ema/after"])  # the weights when the drill took its features
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
        assert o["resumed_step"] == 4
        assert o["resumed"] == o["expected"]


@pytest.mark.parametrize("name", ["dino", "mae", *w.MASKED])
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
