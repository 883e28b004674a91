"""Opening a stream ahead: the first item is fetched in the background, before anyone asks,
and nothing about the stream changes until its items are taken."""

from __future__ import annotations

import threading

import pytest

from raysl.data.ahead import OPEN_AHEAD_STEPS, NextEpoch, Started
from raysl.train.trainer import Trainer


def test_the_first_item_is_fetched_before_it_is_asked_for():
    fetched = threading.Event()

    def items():
        fetched.set()
        yield from range(5)

    it = Started(items())
    assert fetched.wait(10)  # no next() yet: the background thread asked
    assert list(it) == [0, 1, 2, 3, 4]


def test_an_error_or_an_empty_stream_surfaces_where_the_first_item_is_asked_for():
    def broken():
        raise ValueError("shard gone")
        yield

    it = Started(broken())
    with pytest.raises(ValueError, match="shard gone"):
        next(it)
    assert list(Started(iter(()))) == []


class _Batches:
    def __init__(self, epoch):
        self.epoch, self.opened = epoch, False

    def open(self):
        self.opened = True


@pytest.mark.parametrize(
    "steps, total, epoch, step, step_in_epoch, opens",
    [
        ([20, 20, 20], 60, 0, 5, 5, False),  # far from the epoch's end
        ([20, 20, 20], 60, 0, 20 - OPEN_AHEAD_STEPS, 20 - OPEN_AHEAD_STEPS, True),
        ([20, 20, 20], 60, 2, 55, 15, False),  # the last epoch: no next one
        ([20, 20, 20], 20, 0, 15, 15, False),  # max_steps ends the run with this epoch
        ([20, 20, 20], 24, 0, 15, 15, True),  # ... or 4 steps into the next
        ([3, 3], 6, 0, 0, 0, True),  # a short epoch opens the next at its start
    ],
)
def test_the_next_epoch_opens_before_this_one_ends(steps, total, epoch, step, step_in_epoch, opens):
    t = Trainer.__new__(Trainer)
    t.steps, t.total = dict(enumerate(steps)), total  # steps of each epoch left in the run
    t.state, t.next_epoch = {"epoch": epoch, "step": step}, NextEpoch()
    t.batches_from = lambda position, epoch=None: _Batches(epoch)
    got = t.open_next_epoch(step_in_epoch)
    assert (got is not None) == opens
    if opens:
        assert got.opened and got.epoch == epoch + 1


def test_the_next_epoch_opens_two_fills_before_the_end_but_not_before_half_the_epoch():
    rule = NextEpoch()
    rule.saw_fill(5.0)  # the first epoch took 5 s to its first batch
    for _ in range(50):
        rule.saw_step(0.5)
    assert not rule.due(21, 1000) and rule.due(20, 1000)  # 20 steps of 0.5 s = two fills
    assert not rule.due(20, 30) and rule.due(15, 30)  # ... but not before half an epoch of 30
    assert rule.due(OPEN_AHEAD_STEPS, OPEN_AHEAD_STEPS)  # the last few steps always
    rule.saw_fill(1.0)  # a shorter fill later does not shrink the margin
    assert rule.due(20, 1000)
    fresh = NextEpoch()  # nothing measured yet: only the last few steps
    assert not fresh.due(OPEN_AHEAD_STEPS + 1, 1000) and fresh.due(OPEN_AHEAD_STEPS, 1000)
