"""Online kNN monitor checks without Ray: its config is checked before Ray starts, and the
labeled set is decoded and eval-resized."""

import pytest
from shardfactory import digit_images, write_shards

from raysl.config import load_config
from raysl.errors import UserError
from raysl.eval.labeled import load_labeled
from raysl.pretrain import validate


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("monitor")
    write_shards(str(root / "pretrain"), digit_images(64), shard_size=8)
    write_shards(str(root / "knn"), digit_images(150), shard_size=50)  # bank 120, queries 30
    unlabeled = [(k, b, None) for k, b, _ in digit_images(8)]
    write_shards(str(root / "unlabeled"), unlabeled, shard_size=8)
    return root


def _cfg(root, *extra):
    return load_config(
        "quickstart",
        [
            f"data.shards={root / 'pretrain'}",
            "data.image_size=32",
            "data.batch_size=4",
            "model.backbone=test_resnet",
            "method.proj_hidden_dim=64",
            "method.proj_dim=32",
            "optim.name=adamw",
            "deepspeed.zero_stage=2",
            "train.num_workers=2",
            "train.max_steps=6",
            "train.checkpoint_every=6",
            "train.log_every=3",
            f"train.storage_path={root / 'runs'}",
            "train.name=monitored",
            f"eval.knn_shards={root / 'knn'}",
            "eval.knn_every=3",
            "eval.knn_k=[20, 200]",
            *extra,
        ],
    )


def test_monitor_config_is_checked_before_ray(sets):
    assert _cfg(sets, "deepspeed.zero_stage=3").eval.knn_shards  # ZeRO-3: the monitor runs on partitioned weights
    with pytest.raises(
        UserError, match=r"eval.knn_shards .*unlabeled: 8 of 8 rows have no value in the 'label' column"
    ):
        validate(_cfg(sets, f"eval.knn_shards={sets / 'unlabeled'}"))
    with pytest.raises(UserError, match="config key eval.knn_k: 0 is out of range"):
        _cfg(sets, "eval.knn_k=[0]")


def test_labeled_set_is_decoded_eval_resized(sets):
    images, labels = load_labeled(str(sets / "knn"), 24)
    assert images.shape == (150, 3, 24, 24) and images.dtype.is_floating_point is False
    assert labels.tolist() == [lab for _, _, lab in digit_images(150)]
