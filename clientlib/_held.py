"""The keepalive locks a connection holds, and telling their holders when one ends.

Both clients keep one ``HeldLocks`` per connection (the sync client has one
connection at a time). A keepalive lock granted on the connection is added;
releasing it through the client forgets it. It is lost, and its
``LockResult.lost`` turns true and its ``on_lost`` callback is called once,
when the daemon pushes ``lock.lost`` for it (docs/protocol-extensions.md) or
when the connection ends, since the daemon releases a connection's keepalive
locks when it closes. Closing the client on purpose forgets its locks
instead: that is a release, not a loss.

Sans-IO, as the protocol: ``clientlib._connection`` feeds it what it reads
(a call's ``KeepAlive`` or ``Release`` says what its answer does to the
locks), and the clients call the callbacks it hands back (``fire``) where it
is safe for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from ._types import LockResult
from .errors import LockLost

__all__ = ["DISCONNECTED", "HeldLocks", "KeepAlive", "OnLost", "Release", "fire", "lock_lost"]

log = logging.getLogger("clientlib")

#: A holder's callback: called with the lock that was lost.
OnLost = Callable[[LockResult], object]

#: ``lost_reason`` when the connection that kept the lock ended.
DISCONNECTED: Final = "disconnected"
#: ``lost_reason`` when a daemon's push names none (one older than the reasons).
_UNSPECIFIED: Final = "lost"
#: The release status that means the lock was still ours.
_RELEASED: Final = "released"


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """Carried by a keepalive ``lock.acquire`` call: the connection that grants
    the lock watches it from the moment it reads the grant."""

    execution_id: str
    worker_id: str
    on_lost: OnLost | None = None


@dataclass(frozen=True, slots=True)
class Release:
    """Carried by a ``lock.release`` call: once it is answered, the connection
    stops watching the lock (the worker released it: nothing more to tell)."""

    execution_id: str
    worker_id: str


class HeldLocks:
    """The keepalive locks granted on one connection, by (execution id, worker id)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], list[LockResult]] = {}

    def __len__(self) -> int:
        return sum(len(locks) for locks in self._held.values())

    def add(
        self,
        execution_id: str,
        worker_id: str,
        lock: LockResult,
        on_lost: OnLost | None,
        poll: Callable[[], None] | None = None,
    ) -> None:
        lock._watch.on_lost = on_lost
        lock._watch.poll = poll
        self._held.setdefault((execution_id, worker_id), []).append(lock)

    def forget(self, execution_id: str, worker_id: str) -> None:
        """The worker released the lock itself: nothing more to tell."""
        for lock in self._held.pop((execution_id, worker_id), ()):
            lock._watch.poll = None

    def clear(self) -> None:
        """The client is closed: its locks are released, not lost."""
        for key in list(self._held):
            self.forget(*key)

    def pushed(self, params: list[Any]) -> list[LockResult]:
        """A ``lock.lost`` notification arrived: the locks it ends, marked lost."""
        lost = params[0] if params and isinstance(params[0], dict) else {}
        execution_id, worker_id = lost.get("executionId"), lost.get("workerId")
        if not (isinstance(execution_id, str) and isinstance(worker_id, str)):
            return []
        locks = self._held.pop((execution_id, worker_id), [])
        return _mark(locks, str(lost.get("reason") or _UNSPECIFIED))

    def disconnected(self) -> list[LockResult]:
        """The connection ended: every lock it kept is gone, marked lost."""
        locks = [lock for held in self._held.values() for lock in held]
        self._held.clear()
        return _mark(locks, DISCONNECTED)


def _mark(locks: list[LockResult], reason: str) -> list[LockResult]:
    marked = []
    for lock in locks:
        watch = lock._watch
        watch.poll = None
        if watch.reason is None:
            watch.reason = reason
            marked.append(lock)
    return marked


def fire(locks: Iterable[LockResult]) -> None:
    """Call the ``on_lost`` callbacks of ``locks``; a callback's error is logged, not raised."""
    for lock in locks:
        callback = lock._watch.on_lost
        if callback is None:
            continue
        try:
            callback(lock)
        except Exception:  # it must not break the call or the reader it runs in
            log.exception("an on_lost callback raised")


def lock_lost(
    execution_id: str, worker_id: str, lock: LockResult, status: str | None
) -> LockLost | None:
    """What ``execute_with_lock`` raises once the block is done, or None.

    ``status``: the release's (None when the release itself failed). The lock
    was lost if the client was told so while the block ran, or if the release
    found another owner or no lock.
    """
    reason = lock.lost_reason
    if reason is None and status is not None and status != _RELEASED:
        reason = status
    return None if reason is None else LockLost(execution_id, worker_id, reason)
