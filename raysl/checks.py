"""How a config key is checked, as dataclass field metadata read by `raysl.config`."""

from __future__ import annotations


def between(lo=None, hi=None, *, lo_open=False) -> dict:
    """A number in [lo, hi] (lo excluded with lo_open); None: no bound."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


def one_of(*values) -> dict:
    return {"choices": values}
