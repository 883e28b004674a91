"""Online kNN monitor checks without Ray: its config is checked before Ray starts, and the
labeled set is decoded and eval-resized."""

import pytest
from runfactory import monitor_config
from shardfactory import digit_images

from raysl.errors import UserError
from raysl.eval.labeled import load_labeled
from raysl.pretrain import validate


def test_monitor_config_is_checked_before_ray(monitor_sets):
    # ZeRO-3: the monitor runs on partitioned weights
    assert monitor_config(monitor_sets, "deepspeed.zero_stage=3").eval.knn_shards
    with pytest.raises(
        UserError, match=r"eval.knn_shards .*unlabeled: 8 of 8 rows have no value in the 'label' column"
    ):
        validate(monitor_config(monitor_sets, f"eval.knn_shards={monitor_sets / 'unlabeled'}"))
    with pytest.raises(UserError, match="config key eval.knn_k: 0 is out of range"):
        monitor_config(monitor_sets, "eval.knn_k=[0]")


def test_labeled_set_is_decoded_eval_resized(monitor_sets):
    images, labels = load_labeled(str(monitor_sets / "knn"), 24)
    assert images.shape == (150, 3, 24, 24) and images.dtype.is_floating_point is False
    assert labels.tolist() == [lab for _, _, lab in digit_images(150)]
