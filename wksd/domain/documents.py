"""Sessions and the API cache: JSON values under a TTL, one key each."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..store.base import Store
from .values import Decoded, encode, ttl_ms

__all__ = ["DECODED_BYTES", "Documents"]

#: JSON kept decoded per namespace (``Decoded``): a few thousand hot sessions.
DECODED_BYTES = 1024 * 1024


class Documents:
    """JSON documents in one key namespace (``key`` maps a name to its key)."""

    def __init__(self, store: Store, key: Callable[[str], str], what: str) -> None:
        self._store = store
        self._key = key
        self._what = what
        self._decoded = Decoded(DECODED_BYTES)

    async def set(self, name: str, value: Any, ttl: float) -> bool:
        await self._store.set(self._key(name), encode(value, self._what), ttl_ms(ttl))
        return True

    async def get(self, name: str) -> Any:
        key = self._key(name)
        return self._decoded(key, await self._store.get(key))

    async def delete(self, name: str) -> bool:
        return await self._store.delete(self._key(name))

    async def touch(self, name: str, ttl: float) -> bool:
        return await self._store.expire(self._key(name), ttl_ms(ttl))
