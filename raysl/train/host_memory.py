"""Give freed tensor memory back to the OS on CPU workers.

glibc serves allocations below its mmap threshold from heap arenas, and raises that
threshold (up to 32 MiB) each time a larger block is freed, so after the first few steps a
ViT's 4-16 MiB weight and gradient tensors come from the heap. ZeRO-3 gathers and frees
every layer's parameters each step; those freed blocks stay in the arenas, and the worker's
resident memory grows to the whole model however partitioned it is. A fixed threshold
sends every block of 1 MiB or more to mmap, which munmap returns to the OS on free. Only
ZeRO-3 runs on CPU workers do it: the other stages keep their tensors, and small repeated
mmaps would only add page faults to their steps."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter numbers, glibc's malloc.h
M_TRIM_THRESHOLD = -1
THRESHOLD = 1 << 20


def wanted(zero_stage: int, on_gpu: bool) -> bool:
    """Whether a worker should call `return_freed_memory`: ZeRO-3 with host memory as its device memory."""
    return zero_stage == 3 and not on_gpu


def return_freed_memory() -> bool:
    """Fix glibc's mmap threshold at 1 MiB (and trim the heap above 1 MiB free) for this
    process; False where the C library has no mallopt (not glibc)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(M_MMAP_THRESHOLD, THRESHOLD) == 1 and libc.mallopt(M_TRIM_THRESHOLD, THRESHOLD) == 1
    except (OSError, AttributeError):
        ok = False
    if not ok:
        log.info("mallopt is not available (not glibc): freed memory stays with the allocator")
    return ok
