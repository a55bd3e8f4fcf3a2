"""The client methods that make more than one call, written once, sans-IO.

``execute_with_lock`` and ``get_or_compute`` each make several calls with the
caller's own code in between: the block of work, the computation. A
``LockBlock`` and a ``Computation`` hold what those methods mean, which calls
to make and what their answers imply (``LockHeld``, ``LockLost``,
``ComputeFailed``...), and do no I/O. Each client runs them with its own
(``_hold`` and ``_compute``: plain calls in ``Client``; awaited, and shielded
from cancellation where the daemon must hear the end, in ``AsyncClient``).
``Feed`` is the same for a workflow subscription: what a pushed notification
means to it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _calls
from ._calls import CACHE_TTL, LEASE_TTL, LOCK_TTL, Call
from ._held import OnLost, lock_lost
from ._types import LockResult, WorkflowEvent
from .errors import ComputeFailed, LockHeld, LockLost, RequestTimeout, WksError

__all__ = ["Computation", "Feed", "LockBlock", "computation", "lock_block"]

#: Characters of a failed computation's exception that its waiters are told:
#: enough for a message and a short repr, bounded so a huge one is not sent.
_FAILURE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class LockBlock:
    """What ``execute_with_lock`` does around its block: acquire, then settle."""

    execution_id: str
    worker_id: str
    acquire: Call[LockResult]

    @property
    def release(self) -> Call[str]:
        """The release that ends the block, whatever way it ends."""
        return _calls.release_lock(self.execution_id, self.worker_id)

    def granted(self, lock: LockResult) -> LockResult:
        """The lock the block runs under; ``LockHeld`` when another worker holds it."""
        if not lock:
            raise LockHeld(f"{self.execution_id} is locked by {lock.worker_id}", lock.worker_id)
        return lock

    def ended(
        self, lock: LockResult, released: str | WksError, raised: BaseException | None = None
    ) -> None:
        """Settle the block once the release is done (its status, or why it failed).

        If the block raised ``raised``, that exception is the one that
        propagates, never hidden: a lost lock adds a note to it. If the block
        succeeded, ``LockLost`` is raised when the lock was lost or the
        release found another owner or no lock, else a failed release is.
        """
        status = released if isinstance(released, str) else None
        lost = lock_lost(self.execution_id, self.worker_id, lock, status)
        if raised is not None:
            if lost is not None:
                raised.add_note(str(lost))
            return
        if isinstance(released, WksError):
            if lock.lost_reason is not None:
                raise LockLost(self.execution_id, self.worker_id, lock.lost_reason) from released
            raise released
        if lost is not None:
            raise lost


def lock_block(
    execution_id: str,
    worker_id: str,
    ttl: float = LOCK_TTL,
    wait: float = 0,
    *,
    on_lost: OnLost | None = None,
) -> LockBlock:
    """Hold the execution lock for the ``with`` block, then release it.

    The lock is kept alive by the daemon for as long as this client's
    connection is open (and released if the process dies). ``wait``: seconds
    to queue for it. Raises ``LockHeld`` when another worker holds it.

    The block can check ``lock.lost``, and be told through ``on_lost(lock)``,
    if the lock ends before the block does (as ``acquire_lock``'s keepalive
    locks; with ``AsyncClient``, ``on_lost=lambda _: scope.cancel()`` stops
    the work at once). The lock is released however the block ends,
    cancellation included. If the block succeeded, ``LockLost`` is raised
    when the lock was lost or the release found another owner or no lock,
    else a failure to release is raised. If the block raised, its own
    exception propagates, never hidden: a lost lock adds a note to it.
    """
    acquire = _calls.acquire_lock(
        execution_id, worker_id, ttl, keepalive=True, wait=wait, on_lost=on_lost
    )
    return LockBlock(execution_id, worker_id, acquire)


@dataclass(frozen=True, slots=True)
class Computation:
    """What ``get_or_compute`` asks of the daemon around the caller's ``fn``."""

    key: str
    fn: Callable[[], Any]
    ttl: float
    stale_ttl: float
    jitter: float
    lease_ttl: float
    wait: float

    @property
    def lease(self) -> Call[dict[str, Any]]:
        """The value, or the right to compute it (docs/protocol-extensions.md)."""
        return _calls.cache_lease(self.key, self.lease_ttl, self.wait)

    def outcome(self, answer: dict[str, Any]) -> tuple[bool, Any]:
        """What the lease's answer means: ``(True, value)``, return the value;
        ``(False, token)``, compute it, then fill (or abandon) with the token.

        Raises ``ComputeFailed`` when the caller computing it failed,
        ``RequestTimeout`` when waiting for it ran out.
        """
        status = answer.get("status")
        if status == "hit":
            return True, answer["value"]
        if status == "stale":
            token = answer.get("token")
            return (True, answer["value"]) if token is None else (False, token)
        if status == "lease":
            return False, answer["token"]
        if status == "failed":
            raise ComputeFailed(str(answer.get("error")))
        raise RequestTimeout(f"waited too long for another caller to compute {self.key!r}")

    def fill(self, token: str, value: Any) -> Call[dict[str, Any]]:
        """Cache what ``fn`` computed and hand it to the waiters."""
        return _calls.cache_fill(self.key, token, value, self._expiry(), self.stale_ttl)

    def abandon(self, token: str, exc: BaseException) -> Call[dict[str, Any]]:
        """Tell the waiters that ``fn`` raised ``exc``; nothing is cached."""
        failure = f"{type(exc).__name__}: {exc}"[:_FAILURE_CHARS]
        return _calls.cache_abandon(self.key, token, failure)

    def _expiry(self) -> float:
        """``ttl`` moved by up to ``jitter`` of itself either way, so entries
        written together do not all expire together."""
        if self.jitter <= 0:
            return self.ttl
        return self.ttl * (1 + random.uniform(-self.jitter, self.jitter))


def computation(
    key: str,
    fn: Callable[[], Any],
    ttl: float = CACHE_TTL,
    *,
    stale_ttl: float = 0,
    jitter: float = 0,
    lease_ttl: float = LEASE_TTL,
    wait: float = LEASE_TTL,
) -> Computation:
    """The cached value of ``key``, computed by ``fn()`` if missing: single-flight.

    When the value is missing, one caller on the host (and, through a short
    Redis lock, one in the cluster) runs ``fn`` (``AsyncClient``: awaits it)
    while the others wait up to ``wait`` seconds for its result. If ``fn``
    raises (or is cancelled), that caller gets its exception, every waiter
    gets ``ComputeFailed``, and nothing is cached. ``stale_ttl``: serve the
    value that much longer while one caller refreshes it. ``jitter``: spread
    expiry by up to that fraction of ``ttl``.
    """
    return Computation(key, fn, ttl, stale_ttl, jitter, lease_ttl, wait)


class Feed:
    """What both clients' workflow subscriptions keep: the part without I/O.

    ``dropped`` counts events the daemon dropped because this subscriber fell
    more than a thousand behind (catch up with ``workflow_events``). If the
    connection is lost (the daemon restarted), the subscription subscribes
    again on the next one by itself; events in between are missed, and
    ``resubscribed`` counts those moments.
    """

    def __init__(self, execution_id: str | None) -> None:
        self.execution_id = execution_id
        self.dropped = 0
        self.resubscribed = 0

    def _event(self, method: str, params: list[Any]) -> WorkflowEvent | None:
        """A pushed notification as this subscription's event, or None (a
        report of dropped events is counted; another execution's is skipped)."""
        if method == "workflow.event":
            event = params[0]
            if self.execution_id in (None, event.get("executionId")):
                return WorkflowEvent.from_wire(event)
        elif method == "workflow.events_dropped":
            self.dropped += int(params[0])
        return None
