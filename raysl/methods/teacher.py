"""EMA teachers (momentum encoders), in one place: how they are built, named, updated,
saved and restored.

A method declares its pairs with `add_teacher(self, "backbone", build)`: the teacher of
student attribute `<name>` is the attribute `teacher_<name>` (so its state-dict keys are
`teacher_<name>.*`), frozen (requires_grad False), and starts as an exact copy of the
student. `Method.after_step` moves every teacher by `ema_update` with the step's
`ema_momentum` schedule value; the teachers are parameters of the method, so DeepSpeed
checkpoints and weights.safetensors carry them like the rest.

Under ZeRO-3 the method is built inside `deepspeed.zero.Init` (raysl.train.zero), where
every parameter is partitioned as its module is constructed. A deep copy of a partitioned
module would not be a partitioned copy, so the teacher is built by the student's own
builder (inside the same zero.Init, hence partitioned too) and each worker copies its
student partitions (`ds_tensor`) into the teacher's: no worker ever holds a whole one.

Before this module, BYOL named its teacher `target_*`, MoCo v2 `key_*` and MoCo v3
`momentum_*`. `Method` maps those names in a load_state_dict pre-hook (the class lists
them in `legacy_teacher_prefixes`), so checkpoints of older runs still load."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn

PREFIX = "teacher_"


def teacher_name(student: str) -> str:
    return PREFIX + student


def _partitioned(module: nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@torch.no_grad()
def _copy_into(teacher: nn.Module, student: nn.Module) -> None:
    """teacher := student, parameter by parameter (ZeRO-3: this worker's partitions), and buffers."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if [p.ds_shape if hasattr(p, "ds_shape") else p.shape for p in t_params] != [
        p.ds_shape if hasattr(p, "ds_shape") else p.shape for p in s_params
    ]:
        raise RuntimeError("the teacher's builder made a module of another shape than the student")
    for t, s in zip(t_params, s_params):
        _data(t).copy_(_data(s))
    for t_buf, s_buf in zip(teacher.buffers(), student.buffers()):
        t_buf.copy_(s_buf)


def make_teacher(student: nn.Module, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """A frozen copy of `student` that starts equal to it. Unpartitioned: a deep copy.
    Partitioned (ZeRO-3 zero.Init): `build()` makes a module of the same structure, inside
    the zero.Init that is building the method, so it is partitioned as it is made; then the
    student's partitions are copied in. `build` draws from torch's RNG as the student's
    construction did; the generator is put back, so the rest of the method gets the same
    initial weights as without ZeRO-3."""
    if _partitioned(student):
        if build is None:
            raise RuntimeError("a ZeRO-3 partitioned student needs the builder of its teacher (make_teacher(m, build))")
        rng = torch.get_rng_state()
        teacher = build()
        torch.set_rng_state(rng)
        _copy_into(teacher, student)
    else:
        teacher = copy.deepcopy(student)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def add_teacher(method: nn.Module, student: str, build: Callable[[], nn.Module] | None = None) -> nn.Module:
    """Give `method` the EMA teacher of its attribute `student`, as `teacher_<student>`, and
    record the pair (in `method.teacher_pairs`) for `ema_update_all`."""
    teacher = make_teacher(getattr(method, student), build)
    setattr(method, teacher_name(student), teacher)
    pairs = method.__dict__.setdefault("teacher_pairs", [])
    pairs.append(student)
    return teacher


def _data(p: torch.Tensor) -> torch.Tensor:
    # DeepSpeed ZeRO-3 keeps each worker's shard of a parameter in `ds_tensor` (p.data is
    # empty outside forward); teacher and student shapes match, so their shards line up.
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _held_whole(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose whole value is gathered in `p.data` right now."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE  # type: ignore[attr-defined]  # set by DeepSpeed


def _lerp(t: torch.Tensor, s: torch.Tensor, m: float) -> None:
    t.mul_(m).add_(s.to(t.dtype), alpha=1.0 - m)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter
    (buffers, e.g. BN statistics, stay the teacher's own, as in MoCo/BYOL/DINO).

    Under ZeRO-3 each worker moves its partitions (`ds_tensor`), which DeepSpeed gathers
    from and checkpoints. Its persistent parameters (the small ones, under
    `param_persistence_threshold`) are also held whole: `engine.step()` gathers them, and
    forward, `GatheredParameters` and the module state dict read that whole copy until
    DeepSpeed releases it (the next step, or the exit of a `GatheredParameters`). Such a
    copy is moved by the same formula (the student's is gathered from its updated
    partitions, so the two stay equal element for element), or, if the student's is not
    held whole, dropped, so the next forward gathers the moved partitions."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise RuntimeError("EMA teacher and student have different parameter lists")
    m = float(momentum)
    for t, s in zip(t_params, s_params):
        _lerp(_data(t), _data(s), m)
        if hasattr(t, "ds_tensor") and _held_whole(t):
            if hasattr(s, "ds_tensor") and _held_whole(s):
                _lerp(t.data, s.data, m)
            else:
                t.partition()  # type: ignore[attr-defined]  # DeepSpeed's release: frees the whole copy


def ema_update_all(method: nn.Module, momentum: float) -> None:
    """Every teacher of `method` one EMA step towards its student."""
    for student in getattr(method, "teacher_pairs", ()):
        ema_update(getattr(method, teacher_name(student)), getattr(method, student), momentum)


def rename_legacy_keys(state_dict: dict, prefix: str, legacy: tuple[str, ...]) -> None:
    """In place: keys `<prefix><old>x` -> `<prefix>teacher_x` for each old teacher prefix
    (`target_`, `key_`, `momentum_`) of checkpoints written before the teacher abstraction."""
    for old in legacy:
        start = prefix + old
        for key in [k for k in state_dict if k.startswith(start)]:
            state_dict[prefix + PREFIX + key[len(start) :]] = state_dict.pop(key)
