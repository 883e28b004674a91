"""DeepSpeed around a method: ZeRO stage, precision, accumulation and clipping from the config."""

from __future__ import annotations

import torch

from raysl.config import Config
from raysl.errors import UserError
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


LAYERWISE_OPTIMIZERS = ("lars", "lamb")


def check_config(cfg: Config) -> None:
    """Combinations DeepSpeed would run, but wrongly."""
    if cfg.optim.name in LAYERWISE_OPTIMIZERS and cfg.deepspeed.zero_stage >= 1:
        # ZeRO flattens each param group into one tensor, so a per-layer trust ratio
        # would silently become one ratio per group.
        raise UserError(
            f"config key optim.name: {cfg.optim.name} adapts the lr per layer, which ZeRO's flattened "
            f"partitions break; use deepspeed.zero_stage=0 with it, or adamw/adamw8bit with zero_stage "
            f"{cfg.deepspeed.zero_stage}"
        )


def _cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm on the CPU then
    # refuses half-precision weights next to fp32 running statistics.
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[key] = buf.to(dtype)


def _no_cpu_inference_kernel() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its
    comm backend starts: about 50 s of C++ on 2 cores, and on a machine without g++ the
    start fails. Only its `inference_all_reduce` uses the kernel, never training, which
    all-reduces through torch.distributed (gloo), so raysl does not build it."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # import_module: the attribute deepspeed.comm.torch is the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    """Returns the DeepSpeed engine; checkpoints it loads are read with weights_only=True."""
    import deepspeed

    check_config(cfg)
    _no_cpu_inference_kernel()
    if cfg.deepspeed.precision != "fp32":
        _cast_buffers(model, DTYPES[cfg.deepspeed.precision])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    if cfg.deepspeed.zero_stage == 0 and engine.dp_world_size == 1:
        # One worker: DeepSpeed would still flatten, all-reduce and copy back every
        # gradient after each backward (measured 1-4% of a CPU step in `raysl bench step`).
        engine.enable_backward_allreduce = False
    return engine
