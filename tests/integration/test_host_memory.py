"""ZeRO-3 CPU workers give freed tensor memory back to the OS (raysl.train.host_memory).

The pattern is ZeRO-3's: 8 MiB tensors (a gathered layer) allocated between small
long-lived ones, then freed. With glibc's dynamic mmap threshold (raised past 8 MiB by the
first freed 16 MiB block) they come from the heap and their pages stay resident; with the
threshold fixed they are mmapped and go back on free. Each side runs in a fresh process."""

import os
import platform
import subprocess
import sys

import pytest

from raysl.train.host_memory import wanted

SCRIPT = r"""
import sys, torch
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
if sys.argv[1] == "1":
    from raysl.train.host_memory import return_freed_memory
    assert return_freed_memory()
x = torch.ones(4 << 20)
del x
before = rss()
big, small = [], []
for _ in range(64):
    big.append(torch.ones(2 << 20))
    small.append(torch.ones(4096))
del big
print(rss() - before)
"""


def _retained_mib(fixed: bool) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, "1" if fixed else "0"], capture_output=True, text=True, check=True, env=env
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_gathered_layers_leave_the_process_only_with_the_fixed_threshold():
    assert _retained_mib(fixed=False) > 256  # 512 MiB freed, kept resident by glibc's default
    assert _retained_mib(fixed=True) < 64


def test_only_zero3_cpu_workers_change_the_allocator():
    assert wanted(3, on_gpu=False)
    assert not wanted(3, on_gpu=True) and not wanted(2, on_gpu=False) and not wanted(0, on_gpu=False)
