"""Waiting for a condition that has no event to await: poll it, with a deadline.

Used where the thing observed lives in another process (a daemon's metrics, a
server coming up) or is a counter; everything that can be awaited is awaited.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

#: Seconds between looks: short against the deadlines, long against the work.
POLL_INTERVAL = 0.01


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Return once ``condition()`` is true; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what or condition}")
        time.sleep(POLL_INTERVAL)


#: The deadline of ``await_until``; a test wanting another wraps it in a cancel scope.
ASYNC_DEADLINE = 10.0


async def await_until(condition: Callable[[], bool | Awaitable[bool]], what: str = "") -> None:
    """The same in an async test (trio or asyncio), with ``ASYNC_DEADLINE``."""
    with anyio.fail_after(ASYNC_DEADLINE):
        while True:
            met = condition()
            if not isinstance(met, bool):
                met = await met
            if met:
                return
            await anyio.sleep(POLL_INTERVAL)
