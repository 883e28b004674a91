"""Training engine: Ray Train + DeepSpeed ZeRO-2 + AdamW8bit on 2 gloo workers, exact resume."""

import glob
import io
import os
import pickle

import pytest
import torch

from raysl.config import load_config
from raysl.errors import UserError
from raysl.train import checkpoint
from raysl.train.metrics import read_metrics
from raysl.train.run import pretrain, validate
from shardfactory import digit_images, write_shards


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("train_shards"))
    write_shards(d, digit_images(64), shard_size=8)
    return d


def _cfg(shards, storage, name, *extra):
    return load_config(
        "quickstart",
        [
            f"data.shards={shards}", "data.image_size=32", "data.batch_size=4", "model.backbone=test_resnet",
            "method.proj_hidden_dim=64", "method.proj_dim=32", "optim.name=adamw8bit", "deepspeed.zero_stage=2",
            "train.num_workers=2", "train.epochs=2", "train.max_steps=10", "train.checkpoint_every=3",
            "train.keep_checkpoints=2", "train.log_every=1", f"train.storage_path={storage}", f"train.name={name}",
            *extra,
        ],
    )


def _losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def test_validation_happens_before_ray(shards, tmp_path):
    with pytest.raises(UserError, match="model.backbone: 'resnet_eighteen' is not a timm model"):
        validate(_cfg(shards, tmp_path, "x", "model.backbone=resnet_eighteen"))
    with pytest.raises(UserError, match="method.name: 'simclr2'"):
        validate(_cfg(shards, tmp_path, "x", "method.name=simclr2"))
    with pytest.raises(UserError, match="no manifest.json"):
        validate(_cfg(str(tmp_path), tmp_path, "x"))
    with pytest.raises(UserError, match="fewer than data.batch_size"):
        validate(_cfg(shards, tmp_path, "x", "data.batch_size=64"))


@pytest.mark.ray
def test_train_resume_and_failure_recovery_match_an_uninterrupted_run(ray_local, shards, tmp_path, monkeypatch):
    storage = str(tmp_path / "runs")
    # 1. uninterrupted: 10 steps over 2 epochs (64 images / 2 workers / batch 4 = 8 steps an epoch)
    base = pretrain(_cfg(shards, storage, "base"))
    ref = _losses(base["run_dir"])
    assert sorted(ref) == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(v)) for v in ref.values())
    run = base["run_dir"]
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "lr.png"):
        assert os.path.exists(os.path.join(run, f)), f
    assert glob.glob(os.path.join(run, "tensorboard", "events.out.tfevents.*"))
    ckpts = [p for p in glob.glob(os.path.join(run, "checkpoint_*")) if os.path.isdir(p)]
    assert len(ckpts) == 2  # keep last K
    last = base["checkpoint"]
    names = {os.path.basename(p) for p in glob.glob(os.path.join(last, "**", "*"), recursive=True)}
    assert {"worker_0.pt", "worker_1.pt", checkpoint.RUN_STATE}.issubset(names)
    # every worker's ZeRO-2 optimizer shard (8-bit state) was saved, and loads with weights_only=True
    optim_files = glob.glob(os.path.join(last, checkpoint.ENGINE_TAG, "*optim_states.pt"))
    assert len(optim_files) == 2
    state = checkpoint.safe_load(optim_files[0])
    tensors = [t for t in _walk(state) if isinstance(t, torch.Tensor)]
    assert any(t.dtype == torch.uint8 for t in tensors), "8-bit optimizer state should be in the checkpoint"

    # 2. a worker dies at step 5; Ray Train restarts the group from the step-3 checkpoint
    monkeypatch.setenv("RAYSL_FAIL_AT_STEP", "5")
    restarted = pretrain(_cfg(shards, storage, "restarted", "train.max_failures=1"))
    assert os.path.exists(os.path.join(restarted["run_dir"], ".failed_once"))
    assert _losses(restarted["run_dir"]) == ref  # bit-exact, every step

    # 3. the whole job dies at step 8 with no retries left; `--resume` continues it
    monkeypatch.setenv("RAYSL_FAIL_AT_STEP", "8")
    cfg = _cfg(shards, storage, "resumed")
    with pytest.raises(Exception):
        pretrain(cfg)
    monkeypatch.delenv("RAYSL_FAIL_AT_STEP")
    with pytest.raises(UserError, match="--resume"):
        pretrain(cfg)  # refuses to start over an existing run silently
    resumed = pretrain(cfg, resume=True)
    assert _losses(resumed["run_dir"]) == ref


def _walk(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _walk(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _walk(v)
    else:
        yield obj


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/raysl_pwned",))


def test_checkpoint_files_are_never_unpickled(tmp_path):
    path = tmp_path / "worker_0.pt"
    buf = io.BytesIO()
    torch.save({"step": 1, "payload": _Evil()}, buf)
    path.write_bytes(buf.getvalue())
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.safe_load(str(path))
    with pytest.raises(pickle.UnpicklingError):
        checkpoint.WeightsOnlyCheckpointEngine().load(str(path))
    assert not os.path.exists("/tmp/raysl_pwned")


def test_loop_draws_score_histograms_and_warns_on_collapse(tmp_path, capsys):
    from raysl.train.loop import _global_metrics, _report_pictures_and_collapse

    class Method:
        embedding_dim = 128

    gen = torch.Generator().manual_seed(0)
    out = {
        "loss": torch.tensor(1.5),
        "embedding_std": torch.tensor(1e-4),  # collapsed: healthy is ~1/sqrt(128) = 0.088
        "hist_pos": torch.rand(64, generator=gen),
        "hist_neg": torch.rand(640, generator=gen) * 2 - 1,
    }
    state = {"step": 7, "epoch": 0, "skipped": 0}
    metrics = _global_metrics(out, state, 0, {"lr": 0.1, "weight_decay": 0.0}, 10.0)
    assert "hist_pos" not in metrics and metrics["loss"] == 1.5  # only scalars are metrics
    _report_pictures_and_collapse(out, metrics, Method(), str(tmp_path))
    assert os.path.getsize(tmp_path / "score_histograms" / "step_0000007.png") > 1000
    assert "COLLAPSE WARNING at step 7" in capsys.readouterr().out
    healthy = dict(metrics, embedding_std=0.09)
    _report_pictures_and_collapse({"loss": out["loss"]}, healthy, Method(), str(tmp_path))
    assert "COLLAPSE" not in capsys.readouterr().out
