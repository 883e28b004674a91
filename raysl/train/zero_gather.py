"""Whole weights of a module whose parameters ZeRO-3 partitioned (built by raysl.train.zero),
read one parameter at a time so no worker ever holds the whole model: the state dict,
and the safetensors file every checkpoint carries (`weights.safetensors`). On a module
that is not partitioned the same functions read its tensors as they are."""

from __future__ import annotations

import contextlib

import torch


def local_numel(module: torch.nn.Module) -> tuple[int, int]:
    """(elements this worker holds, elements of the whole module) over the module's
    parameters: partitions (`ds_tensor`) under ZeRO-3, whole tensors otherwise."""
    mine = whole = 0
    for p in module.parameters():
        if hasattr(p, "ds_tensor"):
            mine += p.ds_tensor.numel()
            whole += p.ds_numel  # type: ignore[attr-defined]  # set by DeepSpeed on partitioned parameters
        else:
            mine += p.numel()
            whole += p.numel()
    return mine, whole


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
