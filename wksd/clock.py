"""Time, injected (STYLE habit 4): TTLs, ETAs and timestamps ask a clock.

The daemon uses ``SystemClock``; tests use ``ManualClock`` and move time by
hand, so nothing that depends on time needs a sleep to be tested.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock"]


class Clock(Protocol):
    def time(self) -> float:
        """Seconds since the epoch, as a float."""
        ...


class SystemClock:
    time = staticmethod(time.time)


class ManualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now = start

    def time(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time does not go backwards")
        self._now += seconds


def now_ms(clock: Clock) -> int:
    """Integer milliseconds since the epoch: the unit of every wire time."""
    return int(clock.time() * 1000)
