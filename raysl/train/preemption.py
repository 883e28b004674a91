"""A preemption notice: SIGTERM to a training worker (a spot instance being reclaimed, a
Kubernetes pod eviction) makes the run finish its current step, write a checkpoint on
every worker and stop, so that the resumed run redoes no completed step.

Ray's worker processes answer SIGTERM with an immediate exit (a handler installed by
Ray's main loop, on the main thread; the training loop runs in another thread, where
`signal.signal` is refused). While a training loop runs inside `sigterm_as_request`,
that exit becomes a request the loop sees after its step; elsewhere Ray's exit stands.
This leans on one name in `ray._private.worker`, pinned with ray==2.60.0 and covered by
tests/drills/test_train_faults.py, which sends a real SIGTERM to a worker."""

from __future__ import annotations

import contextlib
import threading

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
