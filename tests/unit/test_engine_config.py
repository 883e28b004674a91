"""The engine's configuration without building an engine: ZeRO offload keys, configs
DeepSpeed cannot run, grad checkpointing where timm has none and drop-path rates."""

import pytest
import torch
from runfactory import engine_config

from raysl.config import from_dict
from raysl.errors import UserError
from raysl.methods.base import build_method


@pytest.mark.parametrize("backbone", ["test_resnet", "test_vit"])
def test_drop_path_rate_reaches_the_timm_backbone(backbone):
    """timm spreads model.drop_path_rate over the blocks (stochastic depth: 0 at the first,
    the full rate at the last); every DropPath of the backbone is within it."""
    from timm.layers import DropPath

    def rates(rate):
        torch.manual_seed(0)
        method = build_method(engine_config(model={"backbone": backbone, "drop_path_rate": rate}))
        return [m.drop_prob for m in method.backbone.modules() if isinstance(m, DropPath)]

    got = rates(0.3)
    assert got and max(got) == pytest.approx(0.3, rel=1e-6)  # timm's rates are float32
    assert all(0 <= r <= 0.3 + 1e-6 for r in got)
    assert not rates(0.0)  # no DropPath at all (timm uses Identity)


def test_grad_checkpointing_where_timm_has_none_is_a_config_error():
    from raysl.train.engine import check_config

    with pytest.raises(UserError, match="model.grad_checkpointing: timm model 'cspresnet50' has no activation"):
        check_config(engine_config(model={"backbone": "cspresnet50", "grad_checkpointing": True}))
    check_config(engine_config(model={"backbone": "test_vit", "grad_checkpointing": True}))


def test_offload_keys_map_to_zero_offload_and_infinity():
    from raysl.train.engine import check_config, deepspeed_config

    zero = deepspeed_config(engine_config(zero=3))["zero_optimization"]
    assert zero == {"stage": 3}
    cfg = from_dict(
        {
            "deepspeed": {"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "nvme", "nvme_path": "/nvme/x"},
        }
    )
    zero = deepspeed_config(cfg)["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": False, "nvme_path": "/nvme/x"}
    check_config(cfg)
    small = deepspeed_config(
        from_dict(
            {
                "deepspeed": {
                    "zero_stage": 3,
                    "reduce_bucket_size": 50_000_000,
                    "grad_accum_dtype": "bf16",
                    "sub_group_size": 50_000_000,
                    "max_live_parameters": 10_000_000,
                }
            }
        )
    )
    assert small["zero_optimization"]["reduce_bucket_size"] == 50_000_000
    assert small["zero_optimization"]["sub_group_size"] == 50_000_000
    assert small["zero_optimization"]["stage3_max_live_parameters"] == 10_000_000
    assert small["zero_optimization"]["stage3_max_reuse_distance"] == 10_000_000
    assert small["data_types"] == {"grad_accum_dtype": "bf16"}
    assert "data_types" not in deepspeed_config(engine_config(zero=3))  # DeepSpeed's own defaults


@pytest.mark.parametrize(
    "deepspeed,optimizer,match",
    [
        (
            {"zero_stage": 2, "offload_optimizer": "cpu"},
            "adamw8bit",
            "offload_optimizer: optim.name=adamw8bit .* use optim.name=adamw",
        ),
        (
            {"zero_stage": 2, "offload_optimizer": "cpu"},
            "lion8bit",
            "offload_optimizer: optim.name=lion8bit .* use optim.name=adamw",
        ),
        ({"zero_stage": 2, "offload_optimizer": "cpu"}, "sgd", "offload_optimizer: optim.name=sgd cannot be offloaded"),
        ({"zero_stage": 0, "offload_optimizer": "cpu"}, "adamw", "offload_optimizer: .*zero_stage to 1, 2 or 3"),
        ({"zero_stage": 2, "offload_param": "cpu"}, "adamw", "offload_param: only ZeRO-3"),
        ({"zero_stage": 3, "offload_param": "nvme"}, "adamw", "deepspeed.nvme_path"),
    ],
)
def test_offload_configs_deepspeed_cannot_run_are_config_errors(deepspeed, optimizer, match):
    from raysl.train.engine import check_config

    cfg = from_dict({"optim": {"name": optimizer}, "deepspeed": deepspeed})
    with pytest.raises(UserError, match=match):
        check_config(cfg)
