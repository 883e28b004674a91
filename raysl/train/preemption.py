"""Preemption notices, so that the resumed run redoes no completed step. Two kinds:

A drain notice: a node Ray was told will go (a spot reclaim that the cluster's autoscaler
or KubeRay passes on as a drain with reason PREEMPTION). Ray Train's preemption watcher
sees it, and every worker asks for it with `ray.train.get_preemption_info()` every
`train.preemption_check_steps` steps (a collective: every rank asks at the same steps).
On one, every worker writes a checkpoint and trains no further step (`wait_for_reclaim`);
Ray Train restarts the group on the nodes left once the drain's deadline has passed, and
counts it as a preemption (FailureConfig.max_preemption_failures, unlimited), not against
train.max_failures.

SIGTERM to a training worker (clusters that do not drain: a Kubernetes pod eviction, a
spot instance's own shutdown) makes the run finish its current step, write a checkpoint on
every worker and stop.

Ray's worker processes answer SIGTERM with an immediate exit (a handler installed by
Ray's main loop, on the main thread; the training loop runs in another thread, where
`signal.signal` is refused). While a training loop runs inside `sigterm_as_request`,
that exit becomes a request the loop sees after its step; elsewhere Ray's exit stands.
This leans on one name in `ray._private.worker`, pinned with ray==2.60.0 and covered by
tests/drills/test_train_faults.py, which sends a real SIGTERM to a worker."""

from __future__ import annotations

import contextlib
import threading
import time

_requested = threading.Event()
_watching = threading.Event()


class Preempted(RuntimeError):
    """Raised on every worker once the preemption checkpoint is written; Ray Train counts
    it as a failure (train.max_failures) and restarts from that checkpoint, if allowed."""


@contextlib.contextmanager
def sigterm_as_request():
    """While the training loop runs inside this block, a SIGTERM to this process is a stop
    request (`requested()`) instead of an exit."""
    import ray._private.worker as ray_worker

    ray_exit = ray_worker.raise_sys_exit_with_custom_error_message
    if not getattr(ray_exit, "raysl_watch", False):

        def exit_unless_training(message: str, *args, **kwargs):
            if _watching.is_set() and "SIGTERM" in message:
                _requested.set()
                return
            ray_exit(message, *args, **kwargs)

        exit_unless_training.raysl_watch = True
        ray_worker.raise_sys_exit_with_custom_error_message = exit_unless_training
    _requested.clear()
    _watching.set()
    try:
        yield
    finally:
        _watching.clear()


def requested() -> bool:
    return _requested.is_set()


def wait_for_reclaim() -> None:
    """After a drain notice's checkpoint: train no further step until Ray Train tears the
    group down (a step trained now would be lost with the node)."""
    while True:
        time.sleep(1.0)
