"""Elastic runs (`train.num_workers: [min, max]`) on Ray Train's elastic scaling, and what
raysl adds on Ray Train's controller so that a resize loses as little as it can.

Ray Train restarts the whole worker group on a resize: the workers are killed, and the
new group resumes from the latest checkpoint, so every step after it is trained again.
`ElasticWatch`, a controller callback, makes a grow that Ray decided on (it looks for room
every `train.resize_check_s`) wait for the run's next complete checkpoint, at most
`train.resize_check_s`, before Ray restarts the group: a grow costs the restart, and the
few steps after that checkpoint. It also ends a run that has had room for fewer than its
`min` workers for longer than `train.min_workers_timeout_s` (Ray Train would wait for
ever) with `TooFewWorkers`, which the driver turns into one line (recovery.failure_summary).

This leans on Ray Train 2.60's controller callback hooks and state classes (pinned with
ray==2.60.0, covered by tests/drills/test_elastic.py)."""

from __future__ import annotations

import logging
import time

import ray
from ray.train.v2._internal.execution.callback import ControllerCallback
from ray.train.v2._internal.execution.controller.state import (
    InitializingState,
    ReschedulingState,
    ResizingState,
    RestartingState,
)

from raysl.train import recovery
from raysl.train.recovery import TooFewWorkers

logger = logging.getLogger(__name__)
# how often a grow that waits for the run's next checkpoint looks for it: the restart follows the
# checkpoint by at most this long (one listing of the run's storage a look)
CHECKPOINT_LOOK_S = 0.25


def room_for(resources_per_worker: dict[str, float]) -> int:
    """How many workers of `resources_per_worker` the alive nodes that are not draining hold, all resources free."""
    from ray._private.state import state

    draining = set(state.get_draining_nodes() or {})
    room = 0
    for node in ray.nodes():
        if not node["Alive"] or node["NodeID"] in draining:
            continue
        have = node["Resources"]
        room += int(min(have.get(k, 0.0) // v for k, v in resources_per_worker.items() if v > 0))
    return room


def fresh_reservations(drained_wait_s: float = 30.0) -> None:
    """Before Ray Train counts the workers a restarted group can have: let nodes being drained go
    (at most `drained_wait_s`), then have Ray's autoscaling coordinator look at the cluster again.
    It counts the alive nodes (drained ones too) every 20 s, and Ray Train's scaling policy keeps
    its answer for 1 s: a count that still has a lost node makes Ray start a group the cluster
    cannot hold, and wait 60 s (its worker group start timeout) before it tries fewer."""
    from ray._private.state import state
    from ray.data._internal.cluster_autoscaler.default_autoscaling_coordinator import (
        get_or_create_autoscaling_coordinator,
    )

    try:  # at best: without it Ray only waits longer
        end = time.monotonic() + drained_wait_s
        while time.monotonic() < end:
            drained = set(state.get_draining_nodes() or {})
            if not any(n["Alive"] and n["NodeID"] in drained for n in ray.nodes()):
                break
            time.sleep(0.5)
        coordinator = get_or_create_autoscaling_coordinator()
        ray.get(coordinator.get_reserved_resources.remote("raysl", recompute=True), timeout=10)
        time.sleep(1.0)
    except Exception as exc:
        logger.warning("raysl: could not refresh Ray's view of the cluster before a restart: %s", exc)


class ElasticWatch(ControllerCallback):
    """Runs on Ray Train's controller (see the module's docstring)."""

    def __init__(self, run_dir: str, resources_per_worker: dict, minimum: int, wait_s: float, timeout_s: float):
        self.run_dir, self.resources_per_worker, self.minimum = run_dir, resources_per_worker, minimum
        self.wait_s, self.timeout_s = wait_s, timeout_s
        self.resizing = False  # the next resize decision replaces a running group
        self.waiting_since: float | None = None  # since when no group runs and none is being started

    def after_controller_state_update(self, previous_state, current_state) -> None:
        if isinstance(current_state, ResizingState):
            self.resizing = True
        if not isinstance(current_state, (InitializingState, RestartingState, ReschedulingState)):
            self.waiting_since = None
            return
        now = time.monotonic()
        if self.waiting_since is None:
            self.waiting_since = now
            if not isinstance(current_state, InitializingState):
                fresh_reservations()
        elif self.timeout_s and now - self.waiting_since > self.timeout_s:
            raise TooFewWorkers(room_for(self.resources_per_worker), self.minimum, now - self.waiting_since)

    def before_controller_execute_resize_decision(self, resize_decision) -> None:
        """A resize of a running group: let it write its next checkpoint first (at most `wait_s`)."""
        if not self.resizing:
            return
        self.resizing = False
        before, _ = recovery.newest_complete(self.run_dir)
        end = time.monotonic() + self.wait_s
        while time.monotonic() < end:
            time.sleep(CHECKPOINT_LOOK_S)
            if recovery.newest_complete(self.run_dir)[0] != before:
                return
