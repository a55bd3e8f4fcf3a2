"""Locks for connected workers: keepalive, and acquire that waits its turn.

Theory of operation
-------------------
The atomic, owner-checked steps stay in the domain's ``Locks`` (and under
them the store's scripts); this module adds what only a daemon that sees the
worker's connection can do.

Keepalive. A lock taken with ``keepalive`` belongs to the connection: a task
extends it every third of its TTL while the connection is open, and when the
connection closes (a worker killed with SIGKILL closes it too) the lock is
released at once, owner-checked, instead of after its TTL.

The task remembers when the lock expires by the last word of the store (the
acquire, then each successful extension: its start plus the TTL, on trio's
clock). An extension that fails (the store ``UNAVAILABLE``: Redis gone, in
fail-closed mode) is retried every ``retry_interval``, more often than a
third of the TTL, until one succeeds. If none has by the time less than one
retry interval is left before that confirmed expiry, the lock is ours no
longer as far as anyone else can tell: the task stops keeping it and tells
the connection (``lock.lost``, reason ``expired``), before another daemon can
grant it. The connection is told too when an extension finds the lock
another's or gone (reason ``not_owner``/``not_found``), or when a release
through another connection ends it (reason ``released``).

Waiting. ``lock.acquire`` with ``wait`` queues behind this daemon's earlier
waiters for the same execution id (FIFO) and only the head of the queue tries
the lock. The head tries again when woken (a release through this daemon; a
release through another daemon, announced on Redis pub/sub) and when the
holder's TTL runs out (it knows how long that is from its last try). In case
an announcement was lost (or the TypeScript app released with a plain DEL),
one poller reads every waited lock key at once each ``POLL_INTERVAL`` (one
MGET per ``POLL_BATCH`` ids) and wakes the heads whose lock is free or has
changed hands: waiting costs Redis one command a second, however many wait.
A waiter leaving the queue (granted, timed out, or its connection gone) wakes
the next. A connection may have ``MAX_WAITS_PER_CONNECTION`` waits at once;
one more is refused with ``FULL`` before anything is tried.

A grant goes to a peer that hears of it, or is undone. A wait cancelled (its
peer gone, the daemon draining) after its grant completed in the store, in
the shield that keeps a grant whole, releases that holding before the
cancellation goes on; a grant the server could not deliver is undone by the
``Later``'s ``revoke``. Undoing releases exactly that holding (owner and
fencing token checked, so a later holding of the same worker stays), drops
its keepalive, and announces the release so the next waiter goes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import structlog
import trio

from clientlib.errors import Full, RemoteError

from ..domain.locks import Acquisition, Locks, LockStatus
from ..keys import KeySpace
from ..session import Later, Session
from ..store.base import Store

__all__ = [
    "EXTEND_RETRY",
    "MAX_WAITS_PER_CONNECTION",
    "POLL_BATCH",
    "POLL_INTERVAL",
    "Holds",
    "retry_interval",
]

log = structlog.get_logger("wksd.locks")

#: Seconds between polls of every waited lock when no release is announced:
#: the safety net for a lost pub/sub message or a release by the TypeScript
#: app, which announces nothing. A lock freed behind the daemon's back is
#: seen within a second, for one command a second however many wait.
POLL_INTERVAL: Final = 1.0

#: Lock keys a poll reads per MGET: Redis serves one command at a time, and an
#: MGET of a thousand keys takes it a fraction of a millisecond, where one of
#: a hundred thousand would stall every other client for tens of them.
POLL_BATCH: Final = 1000

#: Waiting ``lock.acquire`` calls one connection may have at once. A worker
#: waits for a lock or a few (a pool of threads on one connection, a few
#: dozen); each wait holds a task and a place in a FIFO queue, so without a
#: bound one client could queue thousands ahead of everyone else's workers.
MAX_WAITS_PER_CONNECTION: Final = 100

#: A waiter whose holder's TTL ran out tries this long after it, so the
#: expiry has happened in Redis too.
EXPIRY_SLACK: Final = 0.005

#: Seconds between tries to extend a kept lock once an extension has failed
#: (a tenth of the TTL for locks shorter than ten of these): a blip of a few
#: seconds costs no lock, and a lock whose extensions keep failing is given
#: up this long before its confirmed expiry, so the holder hears of it while
#: the lock is still its own.
EXTEND_RETRY: Final = 1.0

# Why a kept lock was lost: the ``reason`` of ``lock.lost``.
#: No extension succeeded before the expiry the store last confirmed.
LOST_EXPIRED: Final = "expired"
#: A release through another connection ended it.
LOST_RELEASED: Final = "released"


def retry_interval(ttl: float) -> float:
    """Seconds between extension tries of a kept ``ttl``-second lock after a failure."""
    return min(EXTEND_RETRY, ttl / 10)


@dataclass(eq=False)
class _AcquireWait:
    """A ``lock.acquire`` waiting its turn in its execution id's queue."""

    worker_id: str
    ttl: float
    keepalive: bool
    session: Session
    wake: trio.Event = field(default_factory=trio.Event)


@dataclass(eq=False)
class _Kept:
    """A keepalive lock: whose connection keeps it, and how to stop keeping it."""

    execution_id: str
    worker_id: str
    ttl: float
    session: Session
    #: When the lock expires by the store's last confirmation (trio's clock).
    confirmed: float
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def lost(self, reason: str) -> None:
        """Tell the connection that keeps this lock that it is not held any more."""
        log.warning(
            "keepalive lock lost",
            execution_id=self.execution_id,
            worker_id=self.worker_id,
            reason=reason,
        )
        self.session.push(
            "lock.lost",
            [{"executionId": self.execution_id, "workerId": self.worker_id, "reason": reason}],
        )


class Holds:
    def __init__(
        self,
        locks: Locks,
        store: Store,
        keys: KeySpace,
        *,
        mark_volatile: Callable[[str], None] | None = None,
    ) -> None:
        """``mark_volatile(key)``: called with a kept lock's key each time it is
        (re)taken, so a durable store forgets it at restart (DESIGN 5.1)."""
        self._locks = locks
        self._store = store
        self._keys = keys
        self._mark_volatile = mark_volatile
        self._queues: dict[str, deque[_AcquireWait]] = {}
        self._holders: dict[str, str | None] = {}  # last holder seen by a waiter
        self._kept: dict[tuple[str, str], _Kept] = {}
        self._sessions: dict[int, set[tuple[str, str]]] = {}
        self._waits: dict[int, int] = {}  # session id -> its waits now
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the keepalive tasks and the poller; run for the daemon's life."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._poll)
            task_status.started()
            await trio.sleep_forever()

    # -- the methods ---------------------------------------------------------------
    async def acquire(
        self,
        session: Session,
        execution_id: str,
        worker_id: str,
        ttl: float,
        keepalive: bool,
        wait: float,
    ) -> Acquisition | Later:
        """The acquisition now, or (``wait`` > 0 and the lock held) a ``Later``
        whose ``wait`` gives it once granted or ``wait`` seconds are over."""
        if wait > 0 and self._waits.get(session.id, 0) >= MAX_WAITS_PER_CONNECTION:
            raise Full(
                f"this connection already has {MAX_WAITS_PER_CONNECTION} lock.acquire calls"
                " waiting (MAX_WAITS_PER_CONNECTION); wait for one to end"
            )
        if not (wait > 0 and self._queues.get(execution_id)):
            answer = await self._try(session, execution_id, worker_id, ttl, keepalive)
            if answer.acquired or wait <= 0:
                return answer
            self._holders[execution_id] = answer.holder
        waiter = _AcquireWait(worker_id, ttl, keepalive, session)
        self._queues.setdefault(execution_id, deque()).append(waiter)
        self._waits[session.id] = self._waits.get(session.id, 0) + 1
        deadline = trio.current_time() + wait
        return Later(
            partial(self._wait, execution_id, waiter, deadline),
            partial(self._refusal, execution_id),
            partial(self._revoke, execution_id, waiter),
        )

    async def release(self, session: Session, execution_id: str, worker_id: str) -> LockStatus:
        status = await self._locks.release(execution_id, worker_id)
        kept = self._kept.get((execution_id, worker_id))
        self._forget(execution_id, worker_id)
        if kept is not None and kept.session is not session:
            # Released (or found not ours) through another connection: the
            # one that kept it still thinks it holds it.
            kept.lost(LOST_RELEASED if status is LockStatus.RELEASED else status.value)
        if status is LockStatus.RELEASED:
            await self._announce(execution_id)
        return status

    def notify_released(self, execution_id: str) -> None:
        """Someone released (or lost) this lock: the first waiter should try now."""
        queue = self._queues.get(execution_id)
        if queue:
            queue[0].wake.set()

    def on_release_message(self, message: bytes) -> None:
        """A release announced by another daemon (pub/sub)."""
        self.notify_released(message.decode(errors="replace"))

    @property
    def waiting(self) -> int:
        return sum(len(queue) for queue in self._queues.values())

    @property
    def kept(self) -> int:
        return len(self._kept)

    # -- waiting ---------------------------------------------------------------------
    async def _try(
        self, session: Session, execution_id: str, worker_id: str, ttl: float, keepalive: bool
    ) -> Acquisition:
        # Shielded: a lock granted in Redis must not be lost to a cancellation
        # between the grant and its keepalive being registered.
        with trio.CancelScope(shield=True):
            sent_at = trio.current_time()
            answer = await self._locks.acquire(execution_id, worker_id, ttl)
        if answer.acquired and keepalive:
            self._keep(session, execution_id, worker_id, ttl, sent_at + ttl)
        return answer

    async def _wait(self, execution_id: str, waiter: _AcquireWait, deadline: float) -> Acquisition:
        queue = self._queues[execution_id]
        try:
            while True:
                retry_at = deadline
                if queue[0] is waiter:
                    answer = await self._try(
                        waiter.session,
                        execution_id,
                        waiter.worker_id,
                        waiter.ttl,
                        waiter.keepalive,
                    )
                    if answer.acquired:
                        await self._deliverable(execution_id, waiter, answer)
                        return answer
                    self._holders[execution_id] = answer.holder
                    if answer.holder_ttl_ms is not None:
                        left = answer.holder_ttl_ms / 1000
                        expiry = trio.current_time() + left + EXPIRY_SLACK
                        retry_at = min(retry_at, expiry)
                if trio.current_time() >= deadline:
                    return self._refusal(execution_id)
                with trio.move_on_at(retry_at):
                    await waiter.wake.wait()
                waiter.wake = trio.Event()
        finally:
            self._left(execution_id, waiter)

    def _left(self, execution_id: str, waiter: _AcquireWait) -> None:
        """``waiter`` leaves its queue (and its connection's count); the next goes."""
        queue = self._queues[execution_id]
        head = queue[0] is waiter
        queue.remove(waiter)
        if not queue:
            del self._queues[execution_id]
            self._holders.pop(execution_id, None)
        elif head:
            queue[0].wake.set()
        session_id = waiter.session.id
        self._waits[session_id] -= 1
        if not self._waits[session_id]:
            del self._waits[session_id]

    async def _deliverable(
        self, execution_id: str, waiter: _AcquireWait, grant: Acquisition
    ) -> None:
        """Raise ``Cancelled`` if the wait was cancelled while its grant was in
        flight (shielded): the grant is undone first, nobody would hear of it."""
        try:
            await trio.lowlevel.checkpoint_if_cancelled()
        except trio.Cancelled:
            log.info(
                "lock granted to a wait cancelled meanwhile; undone", execution_id=execution_id
            )
            await self._undo(waiter, execution_id, grant.token)
            raise

    async def _revoke(self, execution_id: str, waiter: _AcquireWait, answer: Acquisition) -> None:
        """Undo a grant the server could not deliver (the peer had gone)."""
        if answer.acquired:
            log.info("lock granted to a peer that has gone; undone", execution_id=execution_id)
            await self._undo(waiter, execution_id, answer.token)

    async def _undo(self, waiter: _AcquireWait, execution_id: str, token: int | None) -> None:
        """Release exactly the holding ``waiter`` was granted, and let the next go."""
        with trio.CancelScope(shield=True):
            kept = self._kept.get((execution_id, waiter.worker_id))
            if kept is not None and kept.session is waiter.session:
                self._forget(execution_id, waiter.worker_id)
            try:
                status = await self._locks.release(execution_id, waiter.worker_id, token)
            except RemoteError as exc:  # it runs out with its TTL
                log.warning("undoing a grant failed", error=exc.code)
                return
            if status is LockStatus.RELEASED:
                await self._announce(execution_id)

    async def _poll(self) -> None:
        """Each ``POLL_INTERVAL``, read every waited lock at once; wake the heads
        whose lock is free or has changed hands since their last try."""
        while True:
            await trio.sleep(POLL_INTERVAL)
            ids = list(self._queues)
            for start in range(0, len(ids), POLL_BATCH):
                batch = ids[start : start + POLL_BATCH]
                try:
                    holders = await self._store.get_many([self._keys.lock(i) for i in batch])
                except RemoteError as exc:  # the heads still try at their holders' expiry
                    log.debug("lock poll failed", error=exc.code)
                    break
                for execution_id, holder in zip(batch, holders, strict=True):
                    seen = self._holders.get(execution_id)
                    if holder is None or holder.decode(errors="replace") != seen:
                        self.notify_released(execution_id)

    def _refusal(self, execution_id: str) -> Acquisition:
        """The answer when the wait runs out (or the daemon shuts down first)."""
        return Acquisition(False, self._holders.get(execution_id), None, None)

    async def _announce(self, execution_id: str) -> None:
        self.notify_released(execution_id)
        try:
            await self._store.publish(self._keys.lock_channel, execution_id.encode())
        except RemoteError as exc:  # the release stands; other daemons poll
            log.warning("release announcement failed", error=exc.code)

    # -- keepalive ----------------------------------------------------------------------
    def _keep(
        self, session: Session, execution_id: str, worker_id: str, ttl: float, confirmed: float
    ) -> None:
        if self._mark_volatile is not None:
            self._mark_volatile(self._keys.lock(execution_id))
        key = (execution_id, worker_id)
        kept = self._kept.get(key)
        if kept is not None and kept.session is session:
            kept.ttl = ttl
            kept.confirmed = confirmed
            return
        if kept is not None:  # the same worker took it again on another connection
            self._forget(execution_id, worker_id)
        kept = self._kept[key] = _Kept(execution_id, worker_id, ttl, session, confirmed)
        if session.id not in self._sessions:
            self._sessions[session.id] = set()
            session.on_close(partial(self._session_closed, session.id))
        self._sessions[session.id].add(key)
        assert self._nursery is not None, "Holds.run is not running"
        self._nursery.start_soon(self._keep_alive, kept)

    async def _keep_alive(self, kept: _Kept) -> None:
        """Extend ``kept`` until it is released, its connection closes, or it is lost."""
        failures = 0
        with kept.scope:
            while True:
                interval = retry_interval(kept.ttl) if failures else kept.ttl / 3
                await trio.sleep_until(min(trio.current_time() + interval, self._give_up_at(kept)))
                if trio.current_time() >= self._give_up_at(kept):
                    self._lose(kept, LOST_EXPIRED)
                    return
                sent_at = trio.current_time()
                # An extension still unanswered when the lock is to be given
                # up is given up on too: the holder must hear in time.
                with trio.move_on_at(self._give_up_at(kept)):
                    try:
                        status = await self._locks.extend(
                            kept.execution_id, kept.worker_id, kept.ttl
                        )
                    except RemoteError as exc:
                        failures += 1
                        # Once per outage at warning level; the retries at debug.
                        level = log.warning if failures == 1 else log.debug
                        level(
                            "keepalive extension failed",
                            execution_id=kept.execution_id,
                            error=exc.code,
                            failures=failures,
                        )
                        continue
                    if status is not LockStatus.EXTENDED:
                        self._lose(kept, status.value)
                        return
                    if failures:
                        log.info(
                            "keepalive extension succeeded again",
                            execution_id=kept.execution_id,
                            failures=failures,
                        )
                    failures = 0
                    kept.confirmed = max(kept.confirmed, sent_at + kept.ttl)

    @staticmethod
    def _give_up_at(kept: _Kept) -> float:
        """When a lock whose extensions keep failing is declared lost."""
        return kept.confirmed - retry_interval(kept.ttl)

    def _lose(self, kept: _Kept, reason: str) -> None:
        self._forget(kept.execution_id, kept.worker_id)
        kept.lost(reason)

    def _forget(self, execution_id: str, worker_id: str) -> None:
        kept = self._kept.pop((execution_id, worker_id), None)
        if kept is not None:
            kept.scope.cancel()
            self._sessions.get(kept.session.id, set()).discard((execution_id, worker_id))

    async def _session_closed(self, session_id: int) -> None:
        """The connection closed: release every lock it kept alive, now."""
        for execution_id, worker_id in sorted(self._sessions.pop(session_id, ())):
            self._forget(execution_id, worker_id)
            try:
                status = await self._locks.release(execution_id, worker_id)
            except RemoteError as exc:
                log.warning("keepalive release failed", error=exc.code)
                continue
            if status is LockStatus.RELEASED:
                await self._announce(execution_id)
