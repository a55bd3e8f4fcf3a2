"""Execution locks: atomic, owner-checked, with fencing tokens (DESIGN 3.2).

The atomic steps are store primitives; this module turns their outcomes into
typed answers (``Acquisition``, ``LockStatus``, ``LockState``), which the
method table turns into the wire's maps. ``expires_at`` comes from this
daemon's clock, the TTL itself is kept by the store.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..clock import Clock, now_ms
from ..keys import KeySpace
from ..store.base import LockStatus, Store
from .values import ttl_ms

__all__ = ["Acquisition", "LockState", "LockStatus", "Locks"]


@dataclass(frozen=True, slots=True)
class Acquisition:
    """The answer to an acquire.

    ``holder`` holds the lock afterwards (the caller when ``acquired``);
    ``token`` is the fencing token and ``expires_at`` the expiry (ms, this
    daemon's clock) when acquired; ``holder_ttl_ms`` is the time left on the
    holder's lock when refused (None when acquired, or when the store cannot
    tell).
    """

    acquired: bool
    holder: str | None
    token: int | None
    expires_at: int | None
    holder_ttl_ms: int | None = None


@dataclass(frozen=True, slots=True)
class LockState:
    """Who holds a lock now (None: nobody) and the ms left on it."""

    holder: str | None
    ttl_ms: int | None


class Locks:
    def __init__(self, store: Store, keys: KeySpace, clock: Clock) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    async def acquire(self, execution_id: str, worker_id: str, ttl: float) -> Acquisition:
        ttl_in_ms = ttl_ms(ttl)
        outcome = await self._store.lock_acquire(execution_id, worker_id, ttl_in_ms)
        if outcome.acquired:
            expires_at = now_ms(self._clock) + ttl_in_ms
            return Acquisition(True, outcome.holder, outcome.token, expires_at)
        return Acquisition(False, outcome.holder, outcome.token, None, outcome.ttl_ms)

    async def release(
        self, execution_id: str, worker_id: str, token: int | None = None
    ) -> LockStatus:
        """With ``token``: only the holding that token was given to (one grant undone)."""
        status = await self._store.lock_release(execution_id, worker_id, token)
        return LockStatus(status)

    async def extend(self, execution_id: str, worker_id: str, ttl: float) -> LockStatus:
        status = await self._store.lock_extend(execution_id, worker_id, ttl_ms(ttl))
        return LockStatus(status)

    async def status(self, execution_id: str) -> LockState:
        holder, ttl = await self._store.get_with_ttl(self._keys.lock(execution_id))
        return LockState(None if holder is None else holder.decode(errors="replace"), ttl)
