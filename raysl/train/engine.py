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
        "zero_optimization": {
            "stage": ds.zero_stage,
            **_offload(cfg),
            **(
                {"reduce_bucket_size": ds.reduce_bucket_size, "allgather_bucket_size": ds.reduce_bucket_size}
                if ds.reduce_bucket_size
                else {}
            ),
            **({"sub_group_size": ds.sub_group_size} if ds.sub_group_size else {}),
            **(
                {
                    "stage3_max_live_parameters": ds.max_live_parameters,
                    "stage3_max_reuse_distance": ds.max_live_parameters,
                    "stage3_prefetch_bucket_size": ds.max_live_parameters,
                }
                if ds.max_live_parameters
                else {}
            ),
        },
        **({"data_types": {"grad_accum_dtype": ds.grad_accum_dtype}} if ds.grad_accum_dtype else {}),
        # bitsandbytes optimizers are not on DeepSpeed's list of tested ZeRO optimizers
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": ds.precision == "bf16"},
        "fp16": {"enabled": ds.precision == "fp16"},
        "steps_per_print": 2**31 - 1,  # raysl prints its own progress
        "wall_clock_breakdown": False,
    }


def _offload(cfg: Config) -> dict:
    """deepspeed.offload_optimizer / offload_param as DeepSpeed's ZeRO-Offload (cpu) and
    ZeRO-Infinity (nvme) sections; pinned host memory where there is a GPU to copy to."""
    ds, out = cfg.deepspeed, {}
    for key, device in (("offload_optimizer", ds.offload_optimizer), ("offload_param", ds.offload_param)):
        if device != "none":
            out[key] = {"device": device, "pin_memory": torch.cuda.is_available() and cfg.train.gpus_per_worker > 0}
            if device == "nvme":
                out[key]["nvme_path"] = ds.nvme_path
    return out


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
    _check_offload(cfg)
    if cfg.model.grad_checkpointing:
        _check_grad_checkpointing(cfg)


def _check_offload(cfg: Config) -> None:
    ds, name = cfg.deepspeed, cfg.optim.name
    if ds.offload_optimizer != "none":
        if ds.zero_stage == 0:
            raise UserError(
                "config key deepspeed.offload_optimizer: ZeRO-Offload moves the ZeRO optimizer's partitions; "
                "set deepspeed.zero_stage to 1, 2 or 3 with it"
            )
        if "8bit" in name:
            raise UserError(
                f"config key deepspeed.offload_optimizer: optim.name={name} keeps its 8-bit state in bitsandbytes "
                "tensors, which DeepSpeed cannot offload or step on the host (ZeRO-Offload steps its own "
                "DeepSpeedCPUAdam); use optim.name=adamw with the offload (fp32 state, 12 B/param, off the device), "
                f"or keep {name} with deepspeed.offload_optimizer=none (2 B/param of state, partitioned by ZeRO)"
                + (
                    "; on GPUs paged_adamw8bit pages its state to host memory when the GPU runs short"
                    if name == "adamw8bit"
                    else ""
                )
            )
        if name != "adamw":
            raise UserError(
                f"config key deepspeed.offload_optimizer: optim.name={name} cannot be offloaded; ZeRO-Offload steps "
                "DeepSpeedCPUAdam on the host, which raysl uses for optim.name=adamw"
            )
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise UserError(
            "config key deepspeed.offload_param: only ZeRO-3 partitions (and so can offload) the parameters; "
            "set deepspeed.zero_stage=3, or use deepspeed.offload_optimizer with stage 1-2"
        )
    if "nvme" in (ds.offload_optimizer, ds.offload_param) and not ds.nvme_path:
        raise UserError(
            "config key deepspeed.nvme_path: offloading to nvme needs a directory on a local NVMe drive, "
            "e.g. deepspeed.nvme_path=/local_nvme/raysl"
        )


def _check_grad_checkpointing(cfg: Config) -> None:
    """The backbone supports timm's set_grad_checkpointing: built on the meta device (no memory)."""
    from raysl.methods.common import make_backbone

    with torch.device("meta"):
        make_backbone(cfg)  # raises the UserError when the model has no activation checkpointing


def _cast_buffers(model: torch.nn.Module, dtype: torch.dtype) -> None:
    # DeepSpeed casts parameters to bf16/fp16 but not buffers; BatchNorm on the CPU then
    # refuses half-precision weights next to fp32 running statistics.
    for module in model.modules():
        for key, buf in module._buffers.items():
            if buf is not None and buf.is_floating_point():
                module._buffers[key] = buf.to(dtype)


def no_cpu_inference_kernel() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce kernel when its
    comm backend starts: about 50 s of C++ on 2 cores, and on a machine without g++ the
    start fails. Only its `inference_all_reduce` uses the kernel, never training, which
    all-reduces through torch.distributed (gloo), so raysl does not build it."""
    import importlib

    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        # import_module: the attribute deepspeed.comm.torch is the torch package itself
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # type: ignore[attr-defined]


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Config):
    """Returns the DeepSpeed engine; checkpoints it loads are read with weights_only=True."""
    import deepspeed

    check_config(cfg)
    no_cpu_inference_kernel()
    if cfg.deepspeed.precision != "fp32":
        _cast_buffers(model, DTYPES[cfg.deepspeed.precision])
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    engine.checkpoint_engine = WeightsOnlyCheckpointEngine()
    if cfg.deepspeed.zero_stage == 0 and engine.dp_world_size == 1:
        # One worker: DeepSpeed would still flatten, all-reduce and copy back every
        # gradient after each backward (measured 1-4% of a CPU step in `raysl bench step`).
        engine.enable_backward_allreduce = False
    return engine
