"""Single-flight cache-aside: one computation per missing value, host- and cluster-wide.

Theory of operation
-------------------
``cache.lease`` answers a cached value at once. For a missing one it starts a
*flight*: the caller gets a lease token and computes the value, then hands it
over with ``cache.fill`` (or reports failure with ``cache.abandon``). Every
other caller on this host asking for the same key meanwhile joins the flight
and waits; ``fill`` gives them the value, ``abandon`` gives them the failure,
and nothing is cached for a failure.

Across daemons, whoever starts a flight also takes a short Redis lease
(``SET NX PX lease_ttl`` on ``cache:lease:{key}``). A daemon that finds the
lease taken starts a *remote* flight: nobody here computes, its callers wait
for the value to appear, woken by the filling daemon's pub/sub message; the
first of them polls slowly in case it is lost and wakes the others, so
waiting costs Redis one lookup per key, not one per waiter. A connection may
have ``MAX_LEASE_WAITS_PER_CONNECTION`` waits at once.

A flight ends without a value when its holder's connection closes or its lease
runs out: its waiters then ask again, and one of them becomes the holder.

Stale-while-revalidate: ``fill`` with ``stale_ttl`` keeps the value that much
longer than ``ttl`` and records when it stops being fresh
(``cache:meta:{key}``). A stale value is answered at once to everyone; the
first caller that finds it stale also gets a lease, to refresh it.

The metadata is bound to the value it describes, so that it can never
outlive or misattribute it: value and metadata are written at once
(``Store.cache_fill``) and expire in the same millisecond, and the metadata
holds a fingerprint of the value's bytes. Any other write of the value (the
seed's plain ``SET EX``, ``cache.set``, a write-back after an outage) gives
the value another expiry (or, one that kept the expiry, other bytes), so
the metadata no longer counts (``Store.cache_lookup``, ``_fresh_until``)
and the value is fresh for as long as it lives. A fill without
``stale_ttl`` deletes the metadata with the write.
"""

from __future__ import annotations

import hashlib
import secrets
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from functools import partial
from typing import Any, Final

import structlog
import trio

from clientlib.errors import Full, RemoteError

from ..clock import Clock, now_ms
from ..domain.values import decode, encode, ttl_ms
from ..keys import KeySpace
from ..session import Later, Session
from ..store.base import Store

__all__ = ["LeaseAnswer", "LeaseStatus", "SingleFlight"]

log = structlog.get_logger("wksd.cache")

#: Seconds between looks for a value another daemon is computing, in case its
#: "filled" message was lost. Only the first waiter of a flight looks (and
#: wakes the others), so waiting costs Redis one lookup per key this often,
#: however many wait.
REMOTE_POLL: Final = 0.2

#: Waiting ``cache.lease`` calls one connection may have at once: each holds
#: a task and a place in a flight, so without a bound one client could queue
#: thousands (the same reasoning, and number, as the lock waits of
#: ``wksd.coordination.holds.MAX_WAITS_PER_CONNECTION``).
MAX_LEASE_WAITS_PER_CONNECTION: Final = 100

#: Bytes of the value's BLAKE2b digest the metadata holds: enough that two
#: values of one key never share a fingerprint by chance.
FINGERPRINT_BYTES: Final = 16


class LeaseStatus(StrEnum):
    """What a ``cache.lease`` found (docs/protocol-extensions.md)."""

    #: The value, fresh.
    HIT = "hit"
    #: The value, past its ttl but within its stale_ttl; perhaps a token to refresh it.
    STALE = "stale"
    #: No value: the caller computes it, and fills or abandons with the token.
    LEASE = "lease"
    #: Another caller computes it, and the wait ran out first.
    TIMEOUT = "timeout"
    #: The caller computing it abandoned it, with this error.
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class LeaseAnswer:
    """The answer to a ``cache.lease``; the fields its status has are set."""

    status: LeaseStatus
    value: Any = None
    token: str | None = None
    error: str | None = None


_TIMEOUT: Final = LeaseAnswer(LeaseStatus.TIMEOUT)


@dataclass(eq=False)
class _Flight:
    token: str | None  # None: another daemon holds the lease
    holder: Session | None
    expires: float  # trio time when the lease runs out
    waiters: deque[_LeaseWait] = field(default_factory=deque)


@dataclass(eq=False)
class _LeaseWait:
    """A ``cache.lease`` waiting in a flight for its value (or to compute it)."""

    session: Session
    lease_ttl: float
    flight: _Flight | None = None
    outcome: LeaseAnswer | None = None
    wake: trio.Event = field(default_factory=trio.Event)


class SingleFlight:
    def __init__(self, store: Store, keys: KeySpace, clock: Clock) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self._flights: dict[str, _Flight] = {}
        self._held: dict[int, set[str]] = {}  # session id -> keys it computes
        self._waits: dict[int, int] = {}  # session id -> its waiting leases now

    @property
    def flights(self) -> int:
        return len(self._flights)

    @property
    def waiters(self) -> int:
        return sum(len(flight.waiters) for flight in self._flights.values())

    # -- the methods ---------------------------------------------------------------
    async def lease(
        self, session: Session, key: str, lease_ttl: float, wait: float
    ) -> LeaseAnswer | Later:
        if wait > 0 and self._waits.get(session.id, 0) >= MAX_LEASE_WAITS_PER_CONNECTION:
            raise Full(
                f"this connection already has {MAX_LEASE_WAITS_PER_CONNECTION} cache.lease"
                " calls waiting (MAX_LEASE_WAITS_PER_CONNECTION); wait for one to end"
            )
        answer = await self._ask(session, key, lease_ttl)
        if isinstance(answer, LeaseAnswer):
            return answer
        if wait <= 0:
            if answer.flight is not None:
                _leave(answer.flight, answer)
            return _TIMEOUT
        self._waits[session.id] = self._waits.get(session.id, 0) + 1
        deadline = trio.current_time() + wait
        return Later(partial(self._wait, key, answer, deadline), lambda: _TIMEOUT)

    async def fill(
        self, session: Session, key: str, token: str, value: Any, ttl: float, stale_ttl: float
    ) -> bool:
        """Cache ``value``; True when ``token`` held the lease (the value is
        cached either way, and the waiters here get it)."""
        raw = encode(value, "cache value")
        fresh_ms, stale_ms = ttl_ms(ttl), (ttl_ms(stale_ttl) if stale_ttl > 0 else 0)
        meta = None
        if stale_ms:
            meta = b"%d %s" % (now_ms(self._clock) + fresh_ms, _fingerprint(raw))
        await self._store.cache_fill(key, raw, fresh_ms + stale_ms, meta)
        flight = self._flights.get(key)
        ours = flight is not None and flight.token == token
        if flight is not None:  # whoever computed it, waiters here can have it
            self._finish(key, flight, LeaseAnswer(LeaseStatus.HIT, decode(raw)))
        await self._end_lease(key, token)
        return ours

    async def abandon(self, session: Session, key: str, token: str, error: str | None) -> bool:
        """End the flight ``token`` leads with ``error`` for its waiters; True
        when it did (False: no such flight, or another's)."""
        flight = self._flights.get(key)
        ours = flight is not None and flight.token == token
        if ours:
            assert flight is not None
            message = error or "the computation failed"
            self._finish(key, flight, LeaseAnswer(LeaseStatus.FAILED, error=message))
        await self._end_lease(key, token)
        return ours

    def on_message(self, message: bytes) -> None:
        """Another daemon filled or abandoned a key (pub/sub): waiters look again."""
        flight = self._flights.get(message.decode(errors="replace"))
        if flight is not None and flight.holder is None:
            for waiter in flight.waiters:
                waiter.wake.set()

    # -- flights -------------------------------------------------------------------------
    async def _ask(self, session: Session, key: str, lease_ttl: float) -> LeaseAnswer | _LeaseWait:
        """An answer now, or the waiter this caller became in a flight."""
        while True:
            value, stale = await self._lookup(key)
            flight = self._flights.get(key)
            if flight is not None and flight.expires <= trio.current_time():
                self._end(key, flight)  # its lease ran out unnoticed
                flight = None
            if value is not _MISSING:
                if not stale:
                    return LeaseAnswer(LeaseStatus.HIT, value)
                refresh = None
                if flight is None:
                    refresh = await self._start(session, key, lease_ttl, wait_remote=False)
                return LeaseAnswer(LeaseStatus.STALE, value, refresh)
            if flight is None:
                token = await self._start(session, key, lease_ttl)
                if token is not None:
                    return LeaseAnswer(LeaseStatus.LEASE, token=token)
                flight = self._flights.get(key)
                if flight is None:
                    continue  # it ended while we asked Redis: look again
            waiter = _LeaseWait(session, lease_ttl, flight)
            flight.waiters.append(waiter)
            return waiter

    async def _start(
        self, session: Session, key: str, lease_ttl: float, wait_remote: bool = True
    ) -> str | None:
        """Start a flight; the token if this caller computes, None if another daemon does.

        The flight is recorded before Redis is asked, so that callers arriving
        meanwhile join it instead of starting their own. If another daemon
        holds the lease, it becomes a remote flight (its callers wait for the
        value) or, without ``wait_remote`` and with nobody waiting, ends.
        """
        token = secrets.token_hex(8)
        flight = self._flights[key] = _Flight(token, session, trio.current_time() + lease_ttl)
        ours = await self._store.set_if_absent(
            self._keys.cache_lease(key), token.encode(), ttl_ms(lease_ttl)
        )
        if self._flights.get(key) is not flight:  # ended while we asked Redis
            if ours:
                await self._end_lease(key, token)
            return None
        if not ours:
            flight.token, flight.holder = None, None
            if not wait_remote and not flight.waiters:
                self._end(key, flight)
            return None
        if session.id not in self._held:
            self._held[session.id] = set()
            session.on_close(partial(self._holder_gone, session.id))
        self._held[session.id].add(key)
        return token

    async def _wait(self, key: str, waiter: _LeaseWait, deadline: float) -> LeaseAnswer:
        try:
            return await self._wait_in_flight(key, waiter, deadline)
        finally:
            session_id = waiter.session.id
            self._waits[session_id] -= 1
            if not self._waits[session_id]:
                del self._waits[session_id]

    async def _wait_in_flight(self, key: str, waiter: _LeaseWait, deadline: float) -> LeaseAnswer:
        try:
            while True:
                if waiter.outcome is not None:
                    return waiter.outcome
                flight = waiter.flight
                if flight is None or self._flights.get(key) is not flight:
                    # The flight ended without a value: ask again (and maybe compute).
                    answer = await self._ask(waiter.session, key, waiter.lease_ttl)
                    if isinstance(answer, LeaseAnswer):
                        return answer
                    waiter = answer
                    continue
                now = trio.current_time()
                if now >= deadline:
                    return _TIMEOUT
                retry_at = min(deadline, flight.expires)
                looks = flight.holder is None and _first(flight, waiter)
                if looks:  # another daemon computes; the first waiter looks for it
                    retry_at = min(retry_at, now + REMOTE_POLL)
                with trio.move_on_at(retry_at):
                    await waiter.wake.wait()
                waiter.wake = trio.Event()
                if waiter.outcome is None and self._flights.get(key) is flight:
                    if trio.current_time() >= flight.expires:
                        self._end(key, flight)  # the lease ran out: all ask again
                    elif flight.holder is None and _first(flight, waiter):
                        value, _ = await self._lookup(key)
                        if value is not _MISSING and self._flights.get(key) is flight:
                            self._finish(key, flight, LeaseAnswer(LeaseStatus.HIT, value))
        finally:
            if waiter.flight is not None:
                _leave(waiter.flight, waiter)

    def _finish(self, key: str, flight: _Flight, outcome: LeaseAnswer) -> None:
        """The flight is over with an outcome for every waiter."""
        self._end(key, flight)
        for waiter in flight.waiters:
            waiter.outcome = outcome
            waiter.wake.set()

    def _end(self, key: str, flight: _Flight) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if flight.holder is not None:
            self._held.get(flight.holder.id, set()).discard(key)
        for waiter in flight.waiters:
            waiter.wake.set()

    async def _holder_gone(self, session_id: int) -> None:
        """A computing caller's connection closed: its flights end; a waiter takes over."""
        for key in self._held.pop(session_id, set()):
            flight = self._flights.get(key)
            if flight is not None and flight.holder is not None and flight.holder.id == session_id:
                self._end(key, flight)
                assert flight.token is not None
                await self._end_lease(key, flight.token)

    async def _end_lease(self, key: str, token: str) -> None:
        try:
            await self._store.delete_if_equal(self._keys.cache_lease(key), token.encode())
            await self._store.publish(self._keys.cache_channel, key.encode())
        except RemoteError as exc:  # the lease expires by itself
            log.warning("cache lease release failed", error=exc.code)

    async def _lookup(self, key: str) -> tuple[Any, bool]:
        """The cached value (or _MISSING), and whether it is stale."""
        raw, meta = await self._store.cache_lookup(key)
        if raw is None:
            return _MISSING, False
        fresh_until = _fresh_until(raw, meta)
        stale = fresh_until is not None and fresh_until <= now_ms(self._clock)
        return decode(raw), stale


_MISSING: Final[Any] = object()


def _first(flight: _Flight, waiter: _LeaseWait) -> bool:
    return bool(flight.waiters) and flight.waiters[0] is waiter


def _leave(flight: _Flight, waiter: _LeaseWait) -> None:
    """``waiter`` leaves ``flight``; if it was the one looking for a remote
    value, the next waiter looks from now on."""
    waiters = flight.waiters
    if waiter not in waiters:
        return
    first = waiters[0] is waiter
    waiters.remove(waiter)
    if first and waiters:
        waiters[0].wake.set()


def _fingerprint(raw: bytes) -> bytes:
    return hashlib.blake2b(raw, digest_size=FINGERPRINT_BYTES).hexdigest().encode()


def _fresh_until(raw: bytes, meta: bytes | None) -> int | None:
    """When the value ``raw`` stops being fresh (ms), if ``meta`` says so of it.

    None (fresh while it lives) for no metadata, metadata of other bytes, and
    metadata this daemon cannot read (an older wksd wrote a bare time).
    """
    if meta is None:
        return None
    fresh_until, _, fingerprint = meta.partition(b" ")
    if fingerprint != _fingerprint(raw) or not fresh_until.isdigit():
        return None
    return int(fresh_until)
