"""Open a stream ahead of its use: its first item is fetched in a background thread.

A Ray Data pipeline starts only when its first batch is asked for, and its fill (plan,
read task, first augment tasks) takes seconds. The trainer opens the next epoch's stream
a few steps before the current epoch ends, so that fill overlaps the last steps instead
of stalling the first step of the next epoch.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from typing import Any

# Steps before an epoch's end at which the next epoch's pipeline starts, so its fill
# overlaps them instead of stalling the next epoch's first step. What it makes meanwhile
# waits in the object store until the epoch turns.
OPEN_AHEAD_STEPS = 8


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
