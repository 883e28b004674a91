"""ZeRO-3 without whole-model copies, building: the method is built partitioned (its whole
weights are read one parameter at a time by raysl.train.zero_gather).

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

from contextlib import contextmanager

import torch

from raysl.config import Config
from raysl.train.engine import deepspeed_config, no_cpu_inference_kernel


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
