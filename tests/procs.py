"""Processes seen through /proc, for tests that kill them from outside."""

import time


def alive(pid: int) -> bool:
    """Running, sleeping or stopped: not gone and not a zombie waiting for its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids, seconds: float = 30.0) -> set[int]:
    """Wait until none of `pids` is alive, at most `seconds`; returns those still alive."""
    pids = set(pids)
    deadline = time.monotonic() + seconds
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if alive(p)}
        if pids:
            time.sleep(0.01)
    return pids
