"""Training checks without Ray: config validation before Ray, checkpoints never unpickled,
score histograms, the collapse warning."""

import io
import os
import pickle

import pytest
import torch
from runfactory import train_config

from raysl.errors import UserError
from raysl.pretrain import validate
from raysl.train import checkpoint


def test_validation_happens_before_ray(train_shards, tmp_path):
    with pytest.raises(UserError, match="model.backbone: 'resnet_eighteen' is not a timm model"):
        validate(train_config(train_shards, tmp_path, "x", "model.backbone=resnet_eighteen"))
    with pytest.raises(UserError, match="method.name: 'simclr2'"):
        validate(train_config(train_shards, tmp_path, "x", "method.name=simclr2"))
    with pytest.raises(UserError, match="no manifest.json"):
        validate(train_config(str(tmp_path), tmp_path, "x"))
    with pytest.raises(UserError, match="fewer than data.batch_size"):
        validate(train_config(train_shards, tmp_path, "x", "data.batch_size=64"))


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


def test_a_feature_transformation_run_draws_score_histograms(tmp_path):
    from raysl.config import load_config
    from raysl.methods.base import build_method
    from raysl.train.metrics import global_metrics

    cfg = load_config(
        "quickstart",
        [
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=32",
            "method.proj_dim=16",
            "method.ft_every=1",
            "method.ft_extrapolate=2.0",
            "method.ft_interpolate=1.6",
        ],
    )
    method = build_method(cfg)
    gen = torch.Generator().manual_seed(0)
    views = [torch.randn(6, 3, 32, 32, generator=gen) for _ in range(2)]
    out = method(views, {"lr": 0.1, "weight_decay": 0.0, "step": 7})
    metrics = global_metrics(out, {"step": 7, "epoch": 0, "skipped": 0}, 0, {"lr": 0.1, "weight_decay": 0.0}, 10.0)
    assert "hist_pos" in out and "hist_pos" not in metrics  # only scalars are metrics
    method.draw(out, 7, str(tmp_path))
    assert os.path.getsize(tmp_path / "score_histograms" / "step_0000007.png") > 1000
    method.draw({"loss": out["loss"]}, 8, str(tmp_path))  # a step without scores draws nothing
    assert sorted(os.listdir(tmp_path / "score_histograms")) == ["step_0000007.png"]


def test_collapse_warning_fires_on_collapsed_embeddings_only():
    from raysl.methods.base import collapse_warning

    assert "COLLAPSE WARNING at step 7" in collapse_warning({"step": 7, "embedding_std": 1e-4}, 128)
    assert collapse_warning({"step": 7, "embedding_std": 0.09}, 128) is None
