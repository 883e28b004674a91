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


# For the Ray clusters of the drills that kill a node: the GCS looks at each raylet every 0.2 s
# instead of 3 s, so a killed node (its raylet refuses the look at once) is declared dead after
# 5 refused looks, in about 1 s instead of 15, before Ray Train counts the nodes for its restart
# (Ray's threshold of 5 and its 10 s timeout of a look are kept: a raylet slowed by a loaded
# machine is not declared dead).
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "200"}
