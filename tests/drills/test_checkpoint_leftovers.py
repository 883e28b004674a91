"""A worker SIGKILLed by pid while its checkpoint is on local disk: the resumed run leaves
no local checkpoint copy of the dead process behind."""

import glob
import os
import re
import signal
import tempfile
import threading
import time

from procs import alive, wait_gone
from runfactory import train_config

from raysl.pretrain import pretrain
from raysl.train import recovery


def _copies() -> dict[str, int]:
    """Each local checkpoint copy in the temp folder: its pid."""
    pattern = os.path.join(tempfile.gettempdir(), "raysl_ckpt_pid*_*")
    return {d: int(re.search(r"_pid(\d+)_", d).group(1)) for d in glob.glob(pattern)}


def test_a_worker_killed_with_a_checkpoint_on_local_disk_leaves_no_copy(ray_local, train_shards, tmp_path):
    run_dir = str(tmp_path / "runs" / "leftovers")
    killed: dict = {}

    def kill_rank0_while_its_checkpoint_is_local():
        while not killed:
            attempts = recovery.read_attempts(run_dir) if os.path.exists(run_dir) else []
            if attempts:
                pid = attempts[0]["rank0_pid"]
                mine = [d for d, p in _copies().items() if p == pid]
                if mine:
                    os.kill(pid, signal.SIGKILL)
                    assert not wait_gone([pid])
                    killed.update(pid=pid, left=[d for d in mine if os.path.isdir(d)])
            time.sleep(0.002)

    killer = threading.Thread(target=kill_rank0_while_its_checkpoint_is_local, daemon=True)
    killer.start()
    cfg = train_config(
        train_shards, str(tmp_path / "runs"), "leftovers", "train.max_failures=1", "train.checkpoint_every=1"
    )
    result = pretrain(cfg)
    killer.join(timeout=5)
    assert killed, "the run ended before rank 0 could be killed with a checkpoint on local disk"
    assert killed["left"], "rank 0's local copy was gone when it died: nothing was left to remove"
    assert len(recovery.read_attempts(run_dir)) == 2 and result["steps"] == 14
    assert not any(os.path.exists(d) for d in killed["left"])
    dead = [d for d, pid in _copies().items() if not alive(pid)]
    assert dead == [], dead  # nor the other worker's, stopped by Ray Train for the restart
