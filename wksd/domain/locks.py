"""Execution locks: atomic, owner-checked, with fencing tokens (DESIGN 3.2).

The atomic steps are store primitives; this module turns their outcomes into
the wire's maps. ``expiresAt`` comes from this daemon's clock, the TTL itself
is kept by the store.
"""

from __future__ import annotations

from typing import Any

from ..clock import Clock, now_ms
from ..keys import KeySpace
from ..store.base import EXTENDED, RELEASED, Store
from .values import ttl_ms

__all__ = ["Locks"]


class Locks:
    def __init__(self, store: Store, keys: KeySpace, clock: Clock) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock

    async def acquire(self, execution_id: str, worker_id: str, ttl: float) -> dict[str, Any]:
        result, _ = await self.attempt(execution_id, worker_id, ttl)
        return result

    async def attempt(
        self, execution_id: str, worker_id: str, ttl: float
    ) -> tuple[dict[str, Any], int | None]:
        """``acquire``'s answer, and the ms left on the holder's lock when refused."""
        ttl_in_ms = ttl_ms(ttl)
        outcome = await self._store.lock_acquire(self._keys, execution_id, worker_id, ttl_in_ms)
        result = {
            "acquired": outcome.acquired,
            "workerId": outcome.holder,
            "fencingToken": outcome.token,
            "expiresAt": now_ms(self._clock) + ttl_in_ms if outcome.acquired else None,
        }
        return result, None if outcome.acquired else outcome.ttl_ms

    async def release(
        self, execution_id: str, worker_id: str, token: int | None = None
    ) -> dict[str, Any]:
        """With ``token``: only the holding that token was given to (one grant undone)."""
        status = await self._store.lock_release(self._keys, execution_id, worker_id, token)
        return {"released": status == RELEASED, "status": status}

    async def extend(self, execution_id: str, worker_id: str, ttl: float) -> dict[str, Any]:
        status = await self._store.lock_extend(self._keys, execution_id, worker_id, ttl_ms(ttl))
        return {"extended": status == EXTENDED, "status": status}

    async def status(self, execution_id: str) -> dict[str, Any]:
        holder, ttl = await self._store.get_with_ttl(self._keys.lock(execution_id))
        return {
            "locked": holder is not None,
            "workerId": None if holder is None else holder.decode(errors="replace"),
            "ttl": ttl,
        }
