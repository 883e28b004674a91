"""DeepSpeed around a method: ZeRO stage, precision, accumulation and clipping from the config."""

from __future__ import annotations

import torch

from raysl.config import Config
from raysl.train.checkpoint import WeightsOnlyCheckpointEngine

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def deepspeed_config(cfg: Config) -> dict:
    ds = cfg.deepspeed
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": ds.grad_accum,
        "gradient_clipping": cfg.optim.clip_grad,
        "zero_optimization": {"stage": ds.zero_stage},
        # bitsandbytes optimizers are not on DeepSpeed's list of tested ZeRO optimizers
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # raysl prints its own progress
        "wall_clock_breakdown": False,
    }


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    """Returns the DeepSpeed engine; checkpoints it loads are read with weights_only=True."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    return engine
