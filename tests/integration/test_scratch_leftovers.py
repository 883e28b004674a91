"""What a killed process leaves in the temp folder (a worker's local checkpoint copy) is
deleted by the next process that looks; a running process's folders are never touched."""

import glob
import os
import signal
import subprocess
import sys
import tempfile

from procs import wait_gone

from raysl.train import storage

_MAKE = (
    "import os, sys\n"
    "from raysl.train import storage\n"
    "d = storage.scratch_dir('ckpt')\n"
    "open(os.path.join(d, 'worker_0.pt'), 'wb').write(b'x' * 100_000)\n"
    "print(d, flush=True)\n"
    "sys.stdin.read()\n"  # until killed
)


def _start_writer():
    proc = subprocess.Popen([sys.executable, "-c", _MAKE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return proc, proc.stdout.readline().strip()


def test_a_killed_processs_scratch_is_removed_and_a_running_ones_kept():
    dead, dead_dir = _start_writer()
    live, live_dir = _start_writer()
    mine = storage.scratch_dir("ckpt")
    try:
        assert os.path.basename(dead_dir).startswith(f"raysl_ckpt_pid{dead.pid}_")
        assert os.path.dirname(dead_dir) == tempfile.gettempdir()
        os.kill(dead.pid, signal.SIGKILL)
        dead.wait()
        assert not wait_gone([dead.pid])
        assert os.path.isdir(dead_dir)  # nothing removed it when the process died

        removed = storage.remove_dead_scratch("ckpt")

        assert dead_dir in removed and not os.path.exists(dead_dir)
        assert os.path.isdir(live_dir) and os.path.isdir(mine)
        assert live_dir not in removed and mine not in removed
    finally:
        live.kill()
        live.wait()
        storage.remove_dead_scratch("ckpt")
        storage.delete_dir(mine)
    assert not os.path.exists(live_dir)


def test_another_hosts_scratch_is_kept():
    """Containers that share one temporary folder have their own process ids: a directory
    named for another host is never taken for a dead process's."""
    dead, _ = _start_writer()
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    other = tempfile.mkdtemp(prefix=f"raysl_ckpt_pid{dead.pid}_another-host_")
    try:
        removed = storage.remove_dead_scratch("ckpt")
        assert other not in removed and os.path.isdir(other)
        assert not glob.glob(os.path.join(tempfile.gettempdir(), f"raysl_ckpt_pid{dead.pid}_{storage._host()}_*"))
    finally:
        storage.delete_dir(other)
