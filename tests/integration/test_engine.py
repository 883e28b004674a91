"""DeepSpeed variants through raysl's engine, without Ray: one process, a gloo world of 1.

The SimCLR method on `test_resnet` goes through `raysl.train.engine.initialize` and the
loop's own `train_step` for ZeRO 0-3, bf16, gradient accumulation, clipping, every CPU
optimizer, and an exact checkpoint round trip through `raysl.train.checkpoint`."""

import json
import math
import os
import shutil

import pytest
import torch
import torch.distributed as dist
from runfactory import ENGINE_BATCH as BATCH
from runfactory import ENGINE_SIZE as SIZE
from runfactory import engine_config

from raysl.config import from_dict
from raysl.data.views import normalize
from raysl.errors import UserError
from raysl.methods.base import build_method
from raysl.train import checkpoint
from raysl.train.build import compile_backbone, make_optimizer, make_schedules
from raysl.train.engine import DTYPES, initialize
from raysl.train.local_world import free_port
from raysl.train.trainer import train_step

TOTAL = 10


@pytest.fixture(scope="module", autouse=True)
def gloo_world_of_one():
    """torch.distributed on gloo with one rank, as a Ray Train worker of a 1-worker run has;
    DeepSpeed finds it initialised and uses it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASTER_ADDR", "127.0.0.1")
        mp.setenv("MASTER_PORT", str(free_port()))
        mp.setenv("RANK", "0")
        mp.setenv("LOCAL_RANK", "0")
        mp.setenv("WORLD_SIZE", "1")
        mp.setenv("LOCAL_WORLD_SIZE", "1")
        dist.init_process_group("gloo", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()
            import deepspeed.comm.comm as ds_comm

            ds_comm.cdb = None  # DeepSpeed's handle on the destroyed group


def _build(cfg, seed=0):
    """As the loop builds a worker: method, schedules, optimizer, DeepSpeed engine."""
    torch.manual_seed(seed)
    method = build_method(cfg)
    if cfg.model.compile:
        compile_backbone(method.backbone, backend=cfg.model.compile_backend)
    schedules = make_schedules(cfg, TOTAL, 1)
    optimizer = make_optimizer(cfg, method, schedules)
    engine = initialize(method, optimizer, cfg)
    return engine, method, optimizer, schedules


def _views(cfg, key: int) -> list[torch.Tensor]:
    """The two views of micro-batch `key`: fixed random uint8 pixels, normalised as the loop does."""
    g = torch.Generator().manual_seed(1000 + key)
    return [
        normalize(torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), dtype=torch.uint8, generator=g)).to(
            DTYPES[cfg.deepspeed.precision]
        )
        for _ in range(2)
    ]


def _step(built, cfg, step: int) -> float:
    engine, method, optimizer, schedules = built
    values = {**schedules.at(step), "step": step}
    micro = (_views(cfg, step * cfg.deepspeed.grad_accum + i) for i in range(cfg.deepspeed.grad_accum))
    out = train_step(engine, method, optimizer, micro, values)
    return float(out["loss"].detach().float())


def _weights(engine) -> list[torch.Tensor]:
    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:  # partitioned: gather the full tensors to read them
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def _changed(before, after) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, after))


@pytest.fixture(scope="module")
def zero0_losses():
    """precision -> the first two losses of the plain engine (ZeRO-0, SGD) in that precision:
    the reference every stage follows."""
    losses: dict[str, list[float]] = {}

    def get(precision: str) -> list[float]:
        if precision not in losses:
            cfg = engine_config(precision=precision, optimizer="sgd")
            built = _build(cfg)
            losses[precision] = [_step(built, cfg, s) for s in range(2)]
        return losses[precision]

    return get


@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (1, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16")])
def test_zero_stages_and_precisions_train(zero, precision, zero0_losses):
    """Each ZeRO stage trains the same model: its first loss (the forward) and its second (after
    one optimizer step) are those of ZeRO-0 in the same precision. SGD: its step is proportional
    to the gradient, so rounding in another reduction order moves it only a little (AdamW's first
    step is the gradient's sign, which rounding flips on the smallest components)."""
    cfg = engine_config(zero=zero, precision=precision, optimizer="sgd")
    built = _build(cfg)
    engine = built[0]
    assert engine.zero_optimization_stage() == zero
    assert engine.bfloat16_enabled() == (precision == "bf16")
    if precision == "bf16":
        assert all(p.dtype == torch.bfloat16 for p in engine.module.parameters())
    before = _weights(engine)
    losses = [_step(built, cfg, s) for s in range(2)]
    assert losses == pytest.approx(zero0_losses(precision), rel=1e-2 if precision == "bf16" else 1e-5)
    assert engine.global_steps == 2
    assert _changed(before, _weights(engine))


def test_cpu_engine_builds_no_cpp_kernel(tmp_path, monkeypatch):
    """DeepSpeed's CPU shared-memory inference kernel is never compiled (it costs ~50 s of
    g++ on a fresh machine and is unused in training): no extension appears in a fresh
    extensions dir, and the comm backend has no kernel."""
    import deepspeed.comm.comm as ds_comm

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    ds_comm.cdb = None  # a new comm backend, as in a fresh worker
    cfg = engine_config()
    built = _build(cfg)
    assert ds_comm.cdb.shm_comm_op is None
    assert _step(built, cfg, 0) == pytest.approx(_reference_loss(cfg, _views(cfg, 0), built[3].at(0)), rel=1e-6)
    assert os.listdir(tmp_path) == []


def _reference_loss(cfg, views, values) -> float:
    """The first step's loss in plain PyTorch: the method _build makes, without DeepSpeed."""
    torch.manual_seed(0)
    with torch.no_grad():
        return float(build_method(cfg)(views, {**values, "step": 0})["loss"])


@pytest.mark.parametrize("zero", [0, 2])
def test_gradient_accumulation_steps_the_optimizer_every_second_micro_batch(zero):
    cfg = engine_config(zero=zero, grad_accum=2)
    engine, _, optimizer, schedules = built = _build(cfg)
    values = {**schedules.at(0), "step": 0}
    start = _weights(engine)
    for i in range(2):
        out = engine(_views(cfg, i), values)
        engine.backward(out["loss"])
        assert engine.is_gradient_accumulation_boundary() == (i == 1)
        engine.step()
        if i == 0:
            assert not _changed(start, _weights(engine)), "the optimizer stepped after the 1st of 2 micro-batches"
            assert engine.global_steps == 0
    assert _changed(start, _weights(engine)), "the optimizer did not step after the 2nd micro-batch"
    assert engine.global_steps == 1
    # train_step takes both micro-batches in one call: one more optimizer step
    _step(built, cfg, 1)
    assert engine.global_steps == 2 and engine.micro_steps == 4


def _reference_grad_norm(cfg, views, values) -> float:
    """The unclipped gradient norm of the same first step, in plain PyTorch."""
    torch.manual_seed(0)
    method = build_method(cfg)
    method(views, values)["loss"].backward()
    return float(
        torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in method.parameters() if p.grad is not None]))
    )


@pytest.mark.parametrize("zero", [0, 2])
def test_gradient_clipping_limits_the_update(zero):
    # SGD's first step is p -= lr * g (momentum buffer = g, no weight decay), so the
    # update's norm is lr x the norm of the gradient DeepSpeed actually applied.
    clip = 1e-3
    cfg = engine_config(zero=zero, optimizer="sgd", clip=clip, weight_decay=0.0)
    engine, _, optimizer, schedules = built = _build(cfg)
    lr = schedules.at(0)["lr"]
    values = {**schedules.at(0), "step": 0}
    raw = _reference_grad_norm(cfg, _views(cfg, 0), values)
    assert raw > 10 * clip
    before = _weights(engine)
    _step(built, cfg, 0)
    after = _weights(engine)
    update = float(torch.linalg.vector_norm(torch.stack([(a - b).norm() for a, b in zip(after, before)])))
    assert update / lr == pytest.approx(clip, rel=1e-3)
    if zero:  # the ZeRO optimizer reports the pre-clipping norm
        assert engine.get_global_grad_norm() == pytest.approx(raw, rel=1e-4)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "lion8bit", "sgd", "lars", "lamb"])
def test_every_cpu_optimizer_steps(name):
    # ZeRO-2 for all but the per-layer optimizers, which raysl runs without ZeRO
    cfg = engine_config(zero=0 if name in ("lars", "lamb") else 2, optimizer=name)
    built = _build(cfg)
    engine = built[0]
    before = _weights(engine)
    loss = _step(built, cfg, 0)
    assert torch.isfinite(torch.tensor(loss))
    assert _changed(before, _weights(engine))
    if "8bit" in name:
        state = [t for s in built[2].state.values() for t in s.values() if torch.is_tensor(t)]
        assert any(t.dtype == torch.uint8 for t in state), "8-bit optimizer state expected"


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_layerwise_optimizers_are_refused_under_zero(name):
    # ZeRO >= 1 flattens each param group, so LARS/LAMB would get one trust ratio per group
    with pytest.raises(UserError, match="zero_stage"):
        _build(engine_config(zero=2, optimizer=name))
    built = _build(engine_config(zero=0, optimizer=name))  # per layer without ZeRO
    seen = sum(len(g["params"]) for g in built[2].param_groups)
    assert seen == len(list(built[1].parameters()))


def _save(built, directory: str, step: int) -> None:
    checkpoint.save(
        directory,
        built[0],
        rank=0,
        world_size=1,
        state={"step": step, "epoch": 0, "consumed": [step * BATCH], "skipped": 0},
    )


@pytest.mark.parametrize("zero", [0, 2, 3])
def test_checkpoint_round_trip_continues_exactly(zero, tmp_path):
    cfg = engine_config(zero=zero, optimizer="adamw8bit")
    original = _build(cfg)
    for s in range(2):
        _step(original, cfg, s)
    _save(original, str(tmp_path), 2)
    _assert_whole_weights_saved(original, cfg, str(tmp_path), zero)
    expected = [_step(original, cfg, s) for s in (2, 3)]

    fresh = _build(cfg, seed=1)  # other initial weights: everything must come from the checkpoint
    meta = checkpoint.load(str(tmp_path), fresh[0], rank=0, world_size=1)  # rank 0's raysl_state.json
    assert meta["state"] == {"step": 2, "epoch": 0, "consumed": [2 * BATCH], "skipped": 0}
    assert checkpoint.run_state(str(tmp_path)) == meta["state"]
    assert fresh[0].global_steps == 2
    # the next step's loss (restored weights) and the one after (restored 8-bit optimizer state)
    assert [_step(fresh, cfg, s) for s in (2, 3)] == expected


@pytest.mark.parametrize("name", ["ibot", "dinov2", "ijepa"])
@pytest.mark.parametrize("zero,precision", [(0, "fp32"), (2, "bf16"), (3, "bf16")])
def test_masked_methods_train_and_resume_exactly(name, zero, precision, tmp_path):
    """iBOT, DINOv2 and I-JEPA under ZeRO 0/2/3, bf16, AdamW8bit: the weights move, and a
    run restored from step 2 starts at step 2 and continues with the same losses (EMA
    teachers, DINOv2's heads and I-JEPA's predictor, the 8-bit optimizer state included)."""
    import zero3_worker as w

    from raysl.train.batch import Batch

    cfg = w.cfg_for(name, zero=zero, optimizer="adamw8bit", precision=precision)

    def step(built, s):
        engine, method, optimizer, schedules = built
        b = w.inputs(cfg, s, 0)
        batch = Batch([v.to(DTYPES[precision]) for v in b.views], b.masks)
        out = train_step(engine, method, optimizer, [batch], {**schedules.at(s), "step": s})
        return float(out["loss"].detach().float())

    original = _build(cfg)
    before = _weights(original[0])
    for s in range(2):
        step(original, s)
    assert _changed(before, _weights(original[0]))
    _save(original, str(tmp_path), 2)
    expected = [step(original, s) for s in (2, 3)]
    assert all(math.isfinite(x) for x in expected), expected

    fresh = _build(cfg, seed=1)
    state = checkpoint.load(str(tmp_path), fresh[0], rank=0, world_size=1)
    assert state["step"] == 2 and fresh[0].global_steps == 2
    assert [step(fresh, s) for s in (2, 3)] == expected


def test_ema_teacher_round_trip_continues_exactly(tmp_path):
    """BYOL's EMA target network is its own state in the checkpoint, and a run restored
    from it continues bit-exactly (the teacher's next EMA update included)."""
    cfg = engine_config(
        zero=2,
        optimizer="adamw8bit",
        method={"name": "byol", "pred_hidden_dim": 32, "ema_momentum": 0.9, "ema_momentum_end": 0.9},
    )
    original = _build(cfg)
    for s in range(2):
        _step(original, cfg, s)
    _save(original, str(tmp_path), 2)
    module = original[0].module.state_dict()
    teacher = {k: v.clone() for k, v in module.items() if k.startswith("teacher_backbone.")}  # as saved
    assert teacher, "the EMA target must be in the method's state"
    moved = [
        k
        for k, v in teacher.items()
        if v.is_floating_point() and not torch.equal(v, module[k.replace("teacher_", "", 1)])
    ]
    assert moved  # the target is its own state, not a copy of the online network
    expected = [_step(original, cfg, s) for s in (2, 3)]

    fresh = _build(cfg, seed=1)
    checkpoint.load(str(tmp_path), fresh[0], rank=0, world_size=1)
    restored = fresh[0].module.state_dict()
    for k, v in teacher.items():
        assert torch.equal(restored[k], v), k
    assert [_step(fresh, cfg, s) for s in (2, 3)] == expected


def _assert_whole_weights_saved(built, cfg, directory: str, zero: int) -> None:
    """weights.safetensors holds the whole trained method in fp32, ZeRO-3 partitions gathered."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(directory, checkpoint.WEIGHTS))
    rng = torch.get_rng_state()
    torch.manual_seed(0)  # the initial weights of _build
    init = build_method(cfg).state_dict()
    plain = build_method(cfg)  # no DeepSpeed: full-size tensors
    torch.set_rng_state(rng)
    plain.load_state_dict(weights, strict=True)  # every key, every shape
    moved = [k for k, v in weights.items() if v.is_floating_point() and not torch.equal(v, init[k])]
    assert any(k.startswith("backbone.") for k in moved) and any(not k.startswith("backbone.") for k in moved)
    if zero < 3:  # unpartitioned: the engine's own tensors
        for k, v in built[0].module.state_dict().items():
            torch.testing.assert_close(weights[k], v.float() if v.is_floating_point() else v, rtol=0, atol=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("ckpt"))
    cfg = engine_config()
    built = _build(cfg)
    _step(built, cfg, 0)
    _save(built, d, 1)
    return d, cfg


@pytest.mark.parametrize("missing", [checkpoint.RUN_STATE])
def test_load_refuses_an_incomplete_checkpoint(saved, tmp_path, missing):
    src, cfg = saved
    d = str(tmp_path / "ckpt")
    shutil.copytree(src, d)
    os.remove(os.path.join(d, missing))
    with pytest.raises(UserError, match=f"incomplete \\(no {missing}\\)"):
        checkpoint.load(d, _build(cfg)[0], rank=0, world_size=1)


def test_a_checkpoint_without_the_runs_state_is_refused_clearly(saved, tmp_path):
    """A checkpoint of an older raysl kept each worker's data position in its worker_<rank>.pt:
    raysl_state.json without the run's state is one clear error, not a wrong resume."""
    src, _ = saved
    d = str(tmp_path / "ckpt")
    shutil.copytree(src, d)
    with open(os.path.join(d, checkpoint.RUN_STATE), "w") as f:
        json.dump({"step": 1, "world_size": 2, "format": 2}, f)
    with pytest.raises(UserError, match="older raysl.*same train.num_workers"):
        checkpoint.run_state(d)


def test_load_at_another_world_size_refuses_another_zero_stage(saved, tmp_path):
    """Another number of workers is resharded (tests/drills/test_reshard.py), but only
    into the ZeRO stage that wrote the partitions."""
    src, cfg = saved
    d = str(tmp_path / "ckpt")
    shutil.copytree(src, d)
    with open(os.path.join(d, checkpoint.RUN_STATE), "w") as f:
        json.dump({"step": 1, "world_size": 2, "zero": {"stage": 2, "groups": []}}, f)
    with pytest.raises(UserError, match="deepspeed.zero_stage=2"):
        checkpoint.load(d, _build(cfg)[0], rank=0, world_size=1)


def test_held_out_loss_leaves_training_untouched():
    """val_loss runs the method's forward on held-out views, then restores its buffers
    (BatchNorm statistics, queues, centers) and the RNG: training goes on exactly as
    without it."""
    from raysl.train.val_loss import held_out_loss

    cfg = engine_config()
    plain, checked = _build(cfg), _build(cfg)
    for s in range(2):
        assert _step(plain, cfg, s) == _step(checked, cfg, s)
    values = {**checked[3].at(2), "step": 2}
    held_out = [_views(cfg, 100 + i) for i in range(2)]
    reference = build_method(cfg)
    reference.load_state_dict(checked[1].state_dict())  # the weights and buffers of step 2
    with torch.no_grad():  # the method's own loss on each held-out batch, averaged
        want = sum(float(reference(views, values)["loss"]) for views in held_out) / len(held_out)
    val = held_out_loss(checked[0], checked[1], held_out, values)
    assert val == pytest.approx(want, rel=1e-6)
    assert val == held_out_loss(checked[0], checked[1], held_out, values)  # nothing it changed carries over
    assert _step(checked, cfg, 2) == _step(plain, cfg, 2) and _step(checked, cfg, 3) == _step(plain, cfg, 3)
    for a, b in zip(plain[0].module.buffers(), checked[0].module.buffers()):
        assert torch.equal(a, b)


def test_compiled_backbone_trains_like_eager_with_the_same_state_dict_keys(tmp_path):
    """model.compile=true compiles the backbone in place, so checkpoints, weights.safetensors
    and exports keep the eager keys (no `_orig_mod.`). aot_eager traces the same forward and
    backward graphs inductor compiles, without inductor's minutes of C++ code generation on
    a 2-core CPU (measured for test_resnet at 32 px, cold cache: 48 s idle, 300 s under load)."""
    from safetensors.torch import load_file

    cfg_eager = engine_config(optimizer="sgd")
    cfg_compiled = engine_config(optimizer="sgd", model={"compile": True, "compile_backend": "aot_eager"})
    eager, compiled = _build(cfg_eager), _build(cfg_compiled)
    assert hasattr(compiled[1].backbone, "_compiled_call_impl") and compiled[1].backbone._compiled_call_impl is not None
    keys = list(eager[0].module.state_dict())
    assert list(compiled[0].module.state_dict()) == keys
    assert not any("_orig_mod" in k for k in keys)
    for s in range(2):  # the 2nd step's loss shows the 1st step's update went through the compiled backward
        assert _step(compiled, cfg_compiled, s) == pytest.approx(_step(eager, cfg_eager, s), rel=1e-4, abs=1e-5)
    for a, b in zip(_weights(eager[0]), _weights(compiled[0])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    _save(compiled, str(tmp_path), 2)
    assert sorted(load_file(os.path.join(tmp_path, checkpoint.WEIGHTS))) == sorted(keys)


def test_resume_and_eval_take_the_last_complete_checkpoint(saved, tmp_path):
    """A run that died while writing checkpoint_000001 leaves a directory without
    raysl_state.json (rank 0 writes it last) that Ray Train never registered (it registers
    a checkpoint once every worker's report is persisted). `--resume` restarts from Ray
    Train's checkpoint-manager snapshot, eval and export from raysl.eval.weights'
    latest_checkpoint: both take checkpoint_000000."""
    import asyncio

    from ray.train import Checkpoint, CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext
    from ray.train.v2._internal.execution.training_report import _TrainingReport

    from raysl.eval.weights import latest_checkpoint
    from raysl.pretrain import has_checkpoints

    src, cfg = saved
    run = tmp_path / "runs" / "r"
    done, half = run / "checkpoint_000000", run / "checkpoint_000001"

    def manager():  # what TorchTrainer(run_config=RunConfig(storage_path, name)).fit() builds on the driver
        return CheckpointManager(CheckpointConfig(num_to_keep=2), StorageContext(str(tmp_path / "runs"), "r"))

    async def first_attempt():
        m = manager()
        shutil.copytree(src, done)
        m.register_checkpoint(_TrainingReport(Checkpoint(str(done)), {"step": 1}, False))
        await asyncio.sleep(0)
        half.mkdir()  # the next one: killed after DeepSpeed's files, before the rest
        shutil.copytree(os.path.join(src, checkpoint.ENGINE_TAG), half / checkpoint.ENGINE_TAG)

    async def resumed():
        return manager().latest_checkpoint_result

    asyncio.run(first_attempt())
    assert asyncio.run(resumed()).checkpoint.path == str(done)
    assert latest_checkpoint(str(run)) == (1, str(done))
    assert has_checkpoints(str(run)) and has_checkpoints(str(run), complete=True)  # pretrain: --resume allowed
    assert checkpoint.load(str(done), _build(cfg)[0], rank=0, world_size=1)["step"] == 1
    with pytest.raises(UserError, match="incomplete"):
        checkpoint.load(str(half), _build(cfg)[0], rank=0, world_size=1)
    shutil.rmtree(done)
    assert has_checkpoints(str(run)) and not has_checkpoints(str(run), complete=True)  # --resume refused


def _saved_activation_bytes(method, views, values) -> tuple[float, int]:
    """(loss, bytes autograd keeps for backward during the forward): the activation memory
    that checkpointing trades for recomputation, counted exactly (each storage once)."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            s = t.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = method(views, values)["loss"]
    loss.backward()
    return float(loss), sum(seen.values())


@pytest.mark.parametrize("method,backbone", [("simclr", "test_vit"), ("mae", "test_vit"), ("simclr", "test_resnet")])
def test_grad_checkpointing_same_losses_less_activation_memory(method, backbone):
    """model.grad_checkpointing=true (timm's set_grad_checkpointing; MAE's encoder too):
    the same loss and gradients as without it, and fewer bytes kept for backward; then the
    same losses through the engine for 2 steps."""
    extra = {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2} if method == "mae" else {}
    cfgs = [
        engine_config(model={"backbone": backbone, "grad_checkpointing": on}, method={"name": method, **extra})
        for on in (False, True)
    ]
    views = _views(cfgs[0], 0)[: 1 if method == "mae" else 2]
    values = {**make_schedules(cfgs[0], TOTAL, 1).at(0), "step": 0}
    results, grads = [], []
    for cfg in cfgs:
        torch.manual_seed(0)
        m = build_method(cfg)
        assert getattr(m.backbone, "grad_checkpointing", False) == cfg.model.grad_checkpointing
        torch.manual_seed(5)  # the same masks / drop-path draws
        results.append(_saved_activation_bytes(m, views, values))
        grads.append([p.grad.clone() for p in m.parameters() if p.grad is not None])
    (loss, plain_bytes), (ckpt_loss, ckpt_bytes) = results
    assert ckpt_loss == pytest.approx(loss, rel=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ckpt_bytes < 0.8 * plain_bytes, (ckpt_bytes, plain_bytes)
    if method == "simclr" and backbone == "test_vit":
        steps = [[_step(_build(c), c, s) for s in range(2)] for c in cfgs]
        assert steps[1] == pytest.approx(steps[0], rel=1e-4)


@pytest.mark.parametrize("zero,offload_param", [(2, "none"), (3, "cpu")])
def test_cpu_offload_trains_like_the_device_optimizer(zero, offload_param):
    """ZeRO-Offload on this CPU machine: optim adamw runs as DeepSpeedCPUAdam (its C++ op is
    built on first use, about 50 s here), stepping the host copy; the losses follow plain AdamW."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    base = engine_config(zero=zero)
    offloaded = from_dict(
        {
            **base.to_dict(),
            "deepspeed": {**base.to_dict()["deepspeed"], "offload_optimizer": "cpu", "offload_param": offload_param},
        }
    )
    plain, off = _build(base), _build(offloaded)
    assert isinstance(off[2], DeepSpeedCPUAdam)
    assert off[0].zero_offload_optimizer().device == "cpu"
    if offload_param != "none":
        assert off[0].zero_offload_param().device == "cpu"
    expected = [_step(plain, base, s) for s in range(3)]
    got = [_step(off, offloaded, s) for s in range(3)]
    assert got == pytest.approx(expected, rel=1e-3)


def test_engine_steps_like_the_plain_loop_of_bench_parity():
    """raysl's optimizer wiring under DeepSpeed (ZeRO-0 fp32, bitsandbytes AdamW8bit, its
    param groups and lr/weight-decay schedules, applied by `train_step`) moves the weights
    exactly as `raysl bench parity`'s plain loop does (AdamW8bit, weight decay on ndim > 1,
    warm-up from 0 then cosine to min_lr), step for step from the same weights and views."""
    import copy

    import bitsandbytes as bnb

    from raysl.bench.parity import Recipe, cosine_lr, raysl_config

    recipe = Recipe(model="test_resnet", batch_size=BATCH, steps=TOTAL, warmup_steps=3, lr=1.0, proj_hidden_dim=32)
    cfg = raysl_config("unused", "unused", "unused", recipe, 0)
    torch.manual_seed(0)
    method = build_method(cfg)
    plain = copy.deepcopy(method)
    schedules = make_schedules(cfg, TOTAL, 1)
    optimizer = make_optimizer(cfg, method, schedules)
    engine = initialize(method, optimizer, cfg)
    params = list(plain.parameters())
    plain_opt = bnb.optim.AdamW8bit(
        [
            {"params": [p for p in params if p.ndim > 1], "weight_decay": recipe.weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
        ],
        lr=recipe.peak_lr,
    )
    for step in range(TOTAL):
        views = _views(cfg, step)
        ours = train_step(engine, method, optimizer, [views], {**schedules.at(step), "step": step})
        for group in plain_opt.param_groups:
            group["lr"] = cosine_lr(step, recipe)
        theirs = plain(views, {"step": step})
        theirs["loss"].backward()
        plain_opt.step()
        plain_opt.zero_grad()
        assert float(ours["loss"]) == pytest.approx(float(theirs["loss"]), abs=1e-5), step
    for (name, a), b in zip(engine.module.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert [g["lr"] for g in optimizer.param_groups] == [recipe.min_lr] * 2
