"""raysl.optim.schedules (unit tier)."""

import numpy as np
import pytest
import torch
from torch import nn

from raysl.errors import UserError
from raysl.optim.optimizers import build_optimizer, param_groups
from raysl.optim.schedules import Schedules, apply, cosine, linear_then_constant, scaled_lr


def test_cosine_warmup_and_endpoints():
    s = cosine(1.0, 0.1, total_steps=100, warmup_steps=10, warmup_start=0.0)
    assert len(s) == 100
    assert s[0] == 0.0 and s[10] == pytest.approx(1.0) and s[-1] == pytest.approx(0.1)
    assert np.all(np.diff(s[:11]) > 0)  # warmup rises to base
    assert np.all(np.diff(s[10:]) < 0)  # cosine falls to final
    assert s[5] == pytest.approx(0.5)  # linear
    assert s[10 + 45] == pytest.approx(0.55, abs=0.02)  # half-way through the cosine ~ midpoint


def test_cosine_no_warmup_and_rising():
    s = cosine(0.996, 1.0, total_steps=50)
    assert len(s) == 50 and s[0] == pytest.approx(0.996) and s[-1] == pytest.approx(1.0)
    assert np.all(np.diff(s) >= 0)
    assert cosine(3.0, 0.0, total_steps=1).tolist() == [3.0]


def test_linear_then_constant():
    t = linear_then_constant(0.04, 0.07, ramp_steps=30, total_steps=100)
    assert len(t) == 100 and t[0] == pytest.approx(0.04) and t[30] == pytest.approx(0.07)
    assert np.all(np.diff(t[:31]) > 0) and np.all(t[30:] == 0.07)
    assert np.all(linear_then_constant(0.04, 0.07, 0, 10) == 0.07)


def _dino_schedules(total=200):
    from raysl.methods.dino import DINO, DINOConfig

    keys = DINOConfig(ema_momentum=0.996, teacher_temp=0.07, teacher_temp_warmup=0.04, teacher_temp_warmup_steps=60)
    return Schedules.build(
        total_steps=total,
        warmup_steps=20,
        lr=1e-3,
        min_lr=1e-6,
        weight_decay=0.04,
        weight_decay_end=0.4,
        method=DINO.schedules(keys, total),
    )


def test_schedules_build_and_at():
    s = _dino_schedules()
    assert {len(a) for a in (s.lr, s.weight_decay, *s.method.values())} == {200}
    v0, v20, vend = s.at(0), s.at(20), s.at(199)
    assert set(v0) == {"lr", "weight_decay", "ema_momentum", "teacher_temp"}
    assert v0["lr"] == 0.0 and v20["lr"] == pytest.approx(1e-3) and vend["lr"] == pytest.approx(1e-6)
    assert v0["weight_decay"] == pytest.approx(0.04) and vend["weight_decay"] == pytest.approx(0.4)
    assert v0["ema_momentum"] == pytest.approx(0.996) and vend["ema_momentum"] == pytest.approx(1.0)
    assert v0["teacher_temp"] == pytest.approx(0.04) and s.at(60)["teacher_temp"] == pytest.approx(0.07)
    assert s.at(10_000) == vend  # past the end keeps the last values
    assert all(isinstance(x, float) for x in v0.values())
    again = _dino_schedules()  # a resumed run recomputes the same arrays from the same config
    assert np.array_equal(s.lr, again.lr) and np.array_equal(s.method["teacher_temp"], again.method["teacher_temp"])


def test_each_method_declares_its_own_schedules():
    from raysl.config import method_config
    from raysl.methods.base import discover

    for name, cls in discover().items():
        arrays = cls.schedules(method_config(name), 50)
        ema = hasattr(method_config(name), "ema_momentum")
        assert ("ema_momentum" in arrays) == ema, name  # every EMA teacher has its momentum schedule
        temp = hasattr(method_config(name), "teacher_temp_warmup")  # DINO's family: a teacher temperature warmup
        assert ("teacher_temp" in arrays) == temp, name
        if temp:
            m = method_config(name)
            assert arrays["teacher_temp"][-1] == pytest.approx(m.teacher_temp), name
        assert all(len(a) == 50 for a in arrays.values())
    with pytest.raises(ValueError, match="teacher_temp has 3 steps"):
        Schedules.build(
            total_steps=5,
            warmup_steps=0,
            lr=1.0,
            min_lr=0.0,
            weight_decay=0.0,
            weight_decay_end=0.0,
            method={"teacher_temp": np.ones(3)},
        )


def test_apply_sets_lr_and_scaled_wd():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    for name in ("adamw", "lars", "adamw8bit"):
        opt = build_optimizer(name, param_groups(m, 0.05), lr=1.0)
        apply(opt, {"lr": 0.123, "weight_decay": 0.3, "ema_momentum": 0.99, "teacher_temp": 0.04})
        decay, nodecay = opt.param_groups
        assert decay["lr"] == nodecay["lr"] == 0.123
        assert decay["weight_decay"] == pytest.approx(0.3) and nodecay["weight_decay"] == 0.0
        m[0].weight.grad = torch.randn_like(m[0].weight)
        opt.step()  # the optimizer accepts the updated groups


def test_scaled_lr():
    assert scaled_lr(1.5e-4, 4096) == pytest.approx(2.4e-3)
    assert scaled_lr(0.3, 256) == pytest.approx(0.3)
    assert scaled_lr(1.0, 64, reference_batch=32) == pytest.approx(2.0)


@pytest.mark.parametrize(
    "call, arg",
    [
        (lambda: cosine(1.0, 0.0, total_steps=0), "total_steps"),
        (lambda: cosine(1.0, 0.0, total_steps=-5), "total_steps"),
        (lambda: cosine(1.0, 0.0, total_steps=10, warmup_steps=10), "warmup_steps"),
        (lambda: cosine(1.0, 0.0, total_steps=10, warmup_steps=-1), "warmup_steps"),
        (lambda: cosine(-1.0, 0.0, total_steps=10), "base"),
        (lambda: linear_then_constant(0.04, 0.07, ramp_steps=11, total_steps=10), "ramp_steps"),
        (
            lambda: Schedules.build(
                total_steps=10, warmup_steps=0, lr=-1e-3, min_lr=0.0, weight_decay=0.0, weight_decay_end=0.0
            ),
            "lr",
        ),
        (
            lambda: Schedules.build(
                total_steps=10, warmup_steps=0, lr=1e-3, min_lr=-1.0, weight_decay=0.0, weight_decay_end=0.0
            ),
            "min_lr",
        ),
        (
            lambda: Schedules.build(
                total_steps=10, warmup_steps=12, lr=1e-3, min_lr=0.0, weight_decay=0.0, weight_decay_end=0.0
            ),
            "warmup_steps",
        ),
        (lambda: scaled_lr(-0.1, 256), "base_lr"),
        (lambda: scaled_lr(0.1, 0), "global_batch"),
    ],
)
def test_bad_arguments(call, arg):
    with pytest.raises(UserError, match=arg):
        call()
