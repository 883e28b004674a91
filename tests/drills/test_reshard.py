"""A checkpoint written by 2 workers resumes on 1 and on 3 (raysl.train.reshard), for ZeRO
0-3 with AdamW, AdamW8bit and Lion8bit, on gloo process groups without Ray.

The workers (tests/reshard_worker.py) train BYOL (an EMA teacher) on test_vit at 32 px for
2 steps and save; then each worker of the new size copies only the files
`reshard.files_for_rank` names for it, resumes from that copy, reports what DeepSpeed says
of its state, saves again and takes one more step. The tests compare the new state with
the saved one: DeepSpeed's own per-parameter views (safe_get_full_fp32_param,
safe_get_full_optimizer_state), and the optimizer files of both checkpoints laid out per
parameter here, by concatenating each worker's partitions (the 8-bit state dequantised
with its own absmax and qmap)."""

import os

import pytest
import reshard_worker as rw
import torch
import torch.multiprocessing as mp

from raysl.train import checkpoint
from raysl.train.local_world import free_port

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

BLOCK = 256


def _run(directory: str, phase: str, world: int) -> list[dict]:
    mp.spawn(rw.worker, args=(world, free_port(), directory, phase), nprocs=world)
    out = [torch.load(os.path.join(directory, f"{phase}{world}_rank{r}.pt"), weights_only=False) for r in range(world)]
    for r, o in enumerate(out):
        assert "error" not in o, f"{phase} on {world}, rank {r}:\n{o['error']}"
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("reshard"))
    saved = _run(d, "save", 2)
    return d, saved, {1: _run(d, "load", 1), 3: _run(d, "load", 3), 2: _run(d, "same", 2)}


def _numels() -> list[list[int]]:
    """Trainable parameters' numels per param group, as raysl builds the groups."""
    from raysl.methods.base import build_method
    from raysl.optim.optimizers import param_groups

    return [[p.numel() for p in g["params"]] for g in param_groups(build_method(rw.w.cfg_for("byol")), 0.05)]


def _units(ckpt: str, stage: int) -> list[list[dict]]:
    """Per worker, per flat group: master, fp32 state vectors, per-element absmax (0 where
    the state is fp32), qmaps and step, read from its optimizer file."""
    import bitsandbytes.functional as F

    from raysl.train.reshard import ZERO_FILE

    files = sorted(
        (int(m.group(1)), n)
        for n in os.listdir(os.path.join(ckpt, "engine"))
        if (m := ZERO_FILE.search(n)) and m.group(2) == "optim"
    )
    out = []
    for _, name in files:
        sd = checkpoint.safe_load(os.path.join(ckpt, "engine", name))["optimizer_state_dict"]
        if stage == 3:
            base, masters = sd["optimizer_state_dict"], sd["fp32_flat_groups"]
        else:
            base, masters = sd["base_optimizer_state"], sd["single_partition_of_fp32_groups"]
        units = []
        for g, group in enumerate(base["param_groups"]):
            st = dict(base["state"][group["params"][0]])
            st.update(st.pop("__bnb_optimizer_quant_state__", {}))
            unit = {"master": masters[g].reshape(-1), "step": int(st["step"]), "vec": {}, "amax": {}, "qmap": {}}
            for key in ("state1", "state2", "exp_avg", "exp_avg_sq"):
                if key not in st:
                    continue
                v = st[key].reshape(-1)
                if v.dtype == torch.uint8:
                    n = key[-1]
                    absmax, code = st[f"absmax{n}"], st[f"qmap{n}"]
                    unit["vec"][key] = F.dequantize_blockwise(v, absmax=absmax, code=code, blocksize=BLOCK)
                    unit["amax"][key] = absmax.repeat_interleave(BLOCK)[: v.numel()]
                    unit["qmap"][key] = code
                else:
                    unit["vec"][key] = v.float()
                    unit["amax"][key] = torch.zeros(v.numel())
            units.append(unit)
        out.append(units)
    return out


def _per_param(units, numels, stage: int, pick) -> list[list[torch.Tensor]]:
    """Per group, each parameter's whole tensor (flat) from the workers' partitions:
    ZeRO-1/2 concatenates the workers' flat partitions; ZeRO-3 each parameter's chunks."""
    world, out = len(units), []
    for g, ns in enumerate(numels):
        if stage == 3:
            chunks = [
                torch.split(pick(u[g])[: sum(-(-n // world) for n in ns)], [-(-n // world) for n in ns]) for u in units
            ]
            out.append([torch.cat([c[j] for c in chunks])[:n] for j, n in enumerate(ns)])
        else:
            flat = torch.cat([pick(u[g]) for u in units])
            out.append(list(torch.split(flat[: sum(ns)], ns)))
    return out


def _one_step_bound(value: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """One quantisation step at each value: its block's absmax times the gap between the
    two qmap codes around value / absmax (0 where the state is fp32: absmax 0)."""
    c = torch.sort(code.float()).values
    x = torch.where(absmax > 0, value / absmax.clamp_min(1e-30), torch.zeros_like(value)).clamp(-1, 1)
    i = torch.searchsorted(c, x).clamp(1, len(c) - 1)
    return absmax * (c[i] - c[i - 1])


def _cases():
    return [pytest.param(s, o, id=f"zero{s}-{o}") for s, o in rw.CASES]


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("stage,opt", _cases())
def test_resumed_on_another_number_of_workers(runs, stage, opt, world):
    from safetensors.torch import load_file

    d, saved, loaded = runs
    before, after = saved[0][(stage, opt)], [o[(stage, opt)] for o in loaded[world]]
    ckpt = os.path.join(rw.case_dir(d, stage, opt), "ckpt")
    # the method (students, heads, EMA teacher) bit for bit
    weights = load_file(os.path.join(ckpt, checkpoint.WEIGHTS))
    assert sorted(after[0]["model"]) == sorted(weights)
    for k, v in weights.items():
        assert torch.equal(after[0]["model"][k], v), k
    for o in after:
        assert o["state"]["step"] == 2 and o["global_steps"] == 2
        assert o["next_loss"] == o["next_loss"] and abs(o["next_loss"]) < 1e6  # one more step runs
    if stage == 0:  # DeepSpeed's own load: the optimizer's state dict as saved
        _assert_same(after[0]["optimizer"]["state"], before["optimizer"]["state"])
        return
    # DeepSpeed's per-parameter views: fp32 master weights and AdamW's state, exactly
    for o in after:
        for name, v in before["master"].items():
            assert torch.equal(o["master"][name], v), name
        for name, states in before["adam"].items():
            for key, v in states.items():
                assert torch.equal(o["adam"][name][key], v), (name, key)
    # the optimizer files of both checkpoints, per parameter
    _assert_files_match(ckpt, os.path.join(rw.case_dir(d, stage, opt), f"resumed{world}"), stage, opt, exact=False)
    if opt.endswith("+bf16"):  # the master weights are not the bf16 parameters: they came from the partitions
        name, v = next((n, v) for n, v in before["master"].items() if v.numel() > 1000)
        assert not torch.equal(v, weights[name]) and torch.equal(v.bfloat16().float(), weights[name])


@pytest.mark.parametrize("stage,opt", [(2, "adamw8bit"), (3, "lion8bit")])
def test_resumed_on_as_many_workers_is_exact(runs, stage, opt):
    d, _, loaded = runs
    case = rw.case_dir(d, stage, opt)
    _assert_files_match(os.path.join(case, "ckpt"), os.path.join(case, "resumed2"), stage, opt, exact=True)


def _assert_files_match(old_ckpt: str, new_ckpt: str, stage: int, opt: str, exact: bool) -> None:
    opt = opt.partition("+")[0]
    numels = _numels()
    old, new = _units(old_ckpt, stage), _units(new_ckpt, stage)
    assert {u["step"] for w in old for u in w} == {u["step"] for w in new for u in w} == {2}
    for a, b in zip(
        _per_param(old, numels, stage, lambda u: u["master"]),
        _per_param(new, numels, stage, lambda u: u["master"]),
        strict=True,
    ):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    keys = set(old[0][0]["vec"])
    assert (
        keys
        == set(new[0][0]["vec"])
        == ({"exp_avg", "exp_avg_sq"} if opt == "adamw" else {"state1", "state2"} if opt == "adamw8bit" else {"state1"})
    )
    eight_bit = 0
    for key in keys:
        was = _per_param(old, numels, stage, lambda u: u["vec"][key])
        now = _per_param(new, numels, stage, lambda u: u["vec"][key])
        amax = _per_param(new, numels, stage, lambda u: u["amax"][key])
        code = next((u[g]["qmap"][key] for u in new for g in range(len(u)) if key in u[g]["qmap"]), None)
        for g in range(len(numels)):
            for x, y, a in zip(was[g], now[g], amax[g], strict=True):
                if exact or code is None:
                    assert torch.equal(x, y), key
                else:
                    bound = _one_step_bound(x, a, code)
                    assert ((y - x).abs() <= bound * (1 + 1e-6)).all(), key
                    eight_bit += int((a > 0).any())
    if "8bit" in opt and not exact:
        assert eight_bit > 0  # the 8-bit path was taken, not only bitsandbytes' fp32 state of small tensors


def _assert_same(a, b) -> None:
    if isinstance(b, dict):
        assert sorted(a, key=str) == sorted(b, key=str)
        for k in b:
            _assert_same(a[k], b[k])
    elif torch.is_tensor(b):
        assert torch.equal(a, b)
    else:
        assert a == b
