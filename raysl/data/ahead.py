"""Open a stream ahead of its use: its first item is fetched in a background thread.

A Ray Data pipeline starts only when its first batch is asked for, and its fill (plan,
read task, first augment tasks, often in a fresh worker process that imports torch)
takes seconds. The trainer opens the next epoch's stream before the current epoch ends
(`NextEpoch`), so that fill overlaps the last steps instead of stalling the first step
of the next epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

# The next epoch opens at the latest this many steps before the current one ends.
OPEN_AHEAD_STEPS = 8


class NextEpoch:
    """When to open the next epoch's stream: once the steps left in this one take less than
    twice the pipeline's fill (its first batch after opening: planning, the read, a fresh
    augment worker importing torch; seconds), so the fill is over before they are. Both
    are measured on the run itself: the run's first fill (cold: an upper bound), an
    average of the steps. Never before half the epoch: the two pipelines share the CPUs,
    and what the next one makes waits in the object store until the epoch turns."""

    def __init__(self) -> None:
        self.fill_s = 0.0
        self.step_s = 0.0

    def saw_fill(self, seconds: float) -> None:
        self.fill_s = max(self.fill_s, seconds)

    def saw_step(self, seconds: float) -> None:
        self.step_s = seconds if not self.step_s else 0.9 * self.step_s + 0.1 * seconds

    def due(self, steps_left: int, epoch_steps: int) -> bool:
        timed = self.step_s > 0 and steps_left * self.step_s <= 2 * self.fill_s
        return steps_left <= OPEN_AHEAD_STEPS or (timed and 2 * steps_left <= epoch_steps)


class Started(Iterator):
    """`iter(iterable)` whose first `next()` runs now, in a thread; the items come out in
    the same order, an exception from the first fetch is raised where the first item is
    asked for."""

    def __init__(self, iterable: Iterable):
        self._it = iter(iterable)
        self._first: tuple[str, Any] = ("pending", None)
        self._thread: threading.Thread | None = threading.Thread(
            target=self._fetch, name="raysl-open-ahead", daemon=True
        )
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = ("item", next(self._it))
        except StopIteration:
            self._first = ("end", None)
        except BaseException as exc:  # raised again in the consumer's thread
            self._first = ("error", exc)

    def __next__(self):
        if self._thread is None:
            return next(self._it)
        self._thread.join()
        self._thread = None
        kind, value = self._first
        self._first = ("done", None)
        if kind == "error":
            raise value
        if kind == "end":
            raise StopIteration
        return value
