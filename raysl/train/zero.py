"""ZeRO-3 without whole-model copies: the method is built partitioned, and whole weights are
read one parameter at a time.

Under `deepspeed.zero_stage=3`, `build_method` constructs the method inside
`deepspeed.zero.Init`: each module's parameters are split across the data-parallel
workers as soon as the module's `__init__` returns, so a worker holds 1/world of every
parameter (its `ds_tensor`) and never the whole model, not even while building it
(timm's init of a ViT-g layer materialises that one layer, then it is partitioned).
EMA teachers are built the same way (raysl.methods.teacher). With
`deepspeed.offload_param` the partitions are created on the CPU or NVMe (zero.Init's
`remote_device`, read from the same DeepSpeed config the engine gets).
Other stages build the method as before."""

from __future__ import annotations

import contextlib
from contextlib import contextmanager

import torch

from raysl.config import Config


def partitioned(cfg: Config) -> bool:
    return cfg.deepspeed.zero_stage == 3


def build_method(cfg: Config):
    """The method of `cfg` (raysl.methods.base.build_method), inside zero.Init under ZeRO-3.
    Every worker must call it (zero.Init is collective: it broadcasts rank 0's initial
    weights, so the workers start identical as they do without ZeRO-3)."""
    from raysl.methods.base import method_class

    cls = method_class(cfg.method.name)  # imports the methods, timm and torch._dynamo outside zero.Init,
    if not partitioned(cfg):  # which patches torch.Tensor construction that _dynamo's import checks
        return cls(cfg)
    import deepspeed

    from raysl.train.engine import deepspeed_config, no_cpu_inference_kernel

    no_cpu_inference_kernel()
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config(cfg)), _inits_gather():
        return cls(cfg)


# In-place initialisers that models call on their submodules' weights after those
# submodules were built (timm's ViT init_weights, raysl's DINO head and MAE decoder).
# Under zero.Init the submodule's parameters are already partitioned by then (p.data is
# empty), so the call would silently do nothing and the model would start from another
# init than without ZeRO-3.
_INIT_FUNCTIONS = (
    "trunc_normal_",
    "trunc_normal_tf_",
    "normal_",
    "uniform_",
    "zeros_",
    "ones_",
    "constant_",
    "xavier_uniform_",
    "xavier_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "orthogonal_",
    "lecun_normal_",
    "variance_scaling_",
)


def _gathering(fn):
    import functools

    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    @functools.wraps(fn)
    def init(tensor, *args, **kwargs):
        if getattr(tensor, "ds_status", None) == ZeroParamStatus.NOT_AVAILABLE:
            # this one parameter whole for the call (collective: every worker builds the
            # same modules in the same order); rank 0's values are partitioned back
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
                return fn(tensor, *args, **kwargs)
        return fn(tensor, *args, **kwargs)

    init.raysl_gathering = True
    return init


@contextmanager
def _inits_gather():
    """While the method is built: torch.nn.init's and timm's initialisers (wherever timm's
    modules imported them by name) gather a partitioned parameter, initialise it whole and
    partition it again, so the weights are the ones a plain build gets."""
    import sys

    patched = []
    modules = [torch.nn.init] + [m for n, m in list(sys.modules.items()) if n.startswith("timm.") and m is not None]
    originals = {}
    for name in _INIT_FUNCTIONS:
        for mod in (torch.nn.init, sys.modules.get("timm.layers.weight_init")):
            fn = getattr(mod, name, None) if mod else None
            if fn is not None and not getattr(fn, "raysl_gathering", False):
                originals[id(fn)] = fn
    wrapped = {key: _gathering(fn) for key, fn in originals.items()}
    for mod in modules:
        for name in _INIT_FUNCTIONS:
            fn = mod.__dict__.get(name)
            if fn is not None and id(fn) in wrapped:
                patched.append((mod, name, fn))
                setattr(mod, name, wrapped[id(fn)])
    try:
        yield
    finally:
        for mod, name, fn in reversed(patched):
            setattr(mod, name, fn)


def is_partitioned(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


def local_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this worker holds, elements of the whole module) over the module's
    parameters: partitions (`ds_tensor`) under ZeRO-3, whole tensors otherwise."""
    mine = whole = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            mine += p.ds_tensor.numel()
            whole += p.ds_numel
        else:
            mine += p.numel()
            whole += p.numel()
    return mine, whole


@contextmanager
def gathered(module: torch.nn.Module):
    """The module's whole parameters for the duration (every worker must enter it):
    ZeRO-3 partitions are gathered, and partitioned again on exit; a no-op otherwise."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield module
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield module


def full_state_dict(module: torch.nn.Module, keep: bool = True) -> dict[str, torch.Tensor]:
    """The module's whole state dict, floating tensors as fp32 on the CPU. Under ZeRO-3 it
    gathers one parameter at a time (every worker must call it), so a worker holds at most
    one whole parameter besides its partitions, and only where `keep` (rank 0) the fp32
    copy being assembled; other workers get {}."""
    out = {}
    for key, t in module.state_dict(keep_vars=True).items():
        if hasattr(t, "ds_id"):
            import deepspeed

            with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                if keep:
                    out[key] = _cpu_fp32(t)
        elif keep:
            out[key] = _cpu_fp32(t)
    return out


def _cpu_fp32(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    return (t.float() if t.is_floating_point() else t).cpu().contiguous().clone()


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def save_full_state(module: torch.nn.Module, path: str, keep: bool = True) -> None:
    """`full_state_dict(module)` written as a safetensors file at `path` (where `keep`,
    i.e. rank 0), streamed: the header is laid out from the shapes (`ds_shape` for a
    partitioned parameter), then each tensor is gathered, written and dropped, so no worker
    ever holds the whole model, not even rank 0 while it writes (a 1.1 B-parameter method
    is 4.4 GB in fp32). Every worker must call it under ZeRO-3 (the gathers are collective).
    The file is a plain safetensors file (`safetensors.torch.load_file` reads it)."""
    import json

    state = module.state_dict(keep_vars=True)
    header, offset = {}, 0
    for key, t in state.items():
        shape = list(t.ds_shape) if hasattr(t, "ds_shape") else list(t.shape)
        dtype = torch.float32 if t.is_floating_point() else t.dtype
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") if keep else contextlib.nullcontext() as f:
        if f:
            f.write(len(raw).to_bytes(8, "little") + raw)
        for t in state.values():
            if hasattr(t, "ds_id"):
                import deepspeed

                with deepspeed.zero.GatheredParameters([t], modifier_rank=None):
                    if f:
                        f.write(_bytes(t))
            elif f:
                f.write(_bytes(t))


def _bytes(t: torch.Tensor) -> bytes:
    """Little-endian bytes of `t` as stored in the file (floating tensors as fp32)."""
    c = _cpu_fp32(t)
    return c.view(torch.uint8).numpy().tobytes() if c.dtype == torch.bool else c.numpy().tobytes()
