"""The near cache: a bounded local copy of the keys Redis keeps coherent for us.

Theory of operation
-------------------
In Redis mode, reads of sessions, API-cache values and workflow states
(the three prefixes of ``tracked_prefixes``) may be answered from here
without a round trip. The copy is coherent because Redis tells us of every
change: the daemon's one command link is opened with ``HELLO 3`` and
``CLIENT TRACKING ON BCAST PREFIX ... NOLOOP`` (``redis_target.open_link``),
so every write to a key under those prefixes, by any client of that Redis,
comes back to us as an ``invalidate`` push on the same connection,
interleaved with our replies in the order Redis executed the commands
(``BCAST``: tracked by prefix, not only keys this connection read, so a copy
made from our own write is invalidated too; ``NOLOOP``: our own writes are
not pushed back to us, or each would drop the copy it just made).

Every change here is made on the link's reader, in wire order
(``RedisLink.on_push`` and a command's ``observe``), never when the awaiting
task resumes: so a reply and a push are applied in the order Redis executed
them. A read reply fills an entry (``filled``), our own write's reply
updates it (``wrote``, ``expire``), a push drops it (``on_push``). A miss
asks ``MULTI, GET k, PTTL k, EXEC`` in one write, so the value and its TTL
are of one moment and no push can fall between them: a push read before
EXEC's reply is news of an older write, one after it of a newer one.

NOLOOP does not cover writes made inside a script on Redis 7.0: Redis pushes
those back to us right after the script's reply, so a value written by a
script (``cache.fill``, a workflow change) is dropped again at once, and its
next read goes to Redis. That costs a round trip, never a stale read.

An entry keeps a local deadline, so a TTL holds even before Redis's expiry
push arrives: the time the command was sent plus the TTL Redis gave, less a
millisecond (Redis counts whole ms), which is never later than Redis's own.
A key Redis does not hold is cached as absent too: its creation is a write
like any other, and is pushed.

The copy is bounded in bytes (``max_bytes``): a key's UTF-8 length, its
value's length and ``ENTRY_OVERHEAD`` per entry; the least recently used
goes first. A value over ``max_bytes // MAX_VALUE_FRACTION`` is not cached.
Losing the link loses the pushes, so the failover store ``clear``s the whole
copy whenever the link is lost or a new one starts, and a read never takes
it from a link already broken.

Counts are plain ints, read by the metrics collector at scrape time
(``Metrics.observe_near_cache``).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final, Protocol

from ..keys import KeySpace

__all__ = [
    "ENTRY_OVERHEAD",
    "INVALIDATION_REASONS",
    "MAX_VALUE_FRACTION",
    "NearCache",
    "tracked_prefixes",
]

#: Bytes counted per entry beside its key and value: what CPython 3.11 takes
#: for the OrderedDict slot, the entry tuple, the deadline and the key's and
#: value's object headers (about 260, measured with tracemalloc).
ENTRY_OVERHEAD: Final = 256

#: No value over this fraction of the bound is cached: a few big values
#: would push out every small hot one.
MAX_VALUE_FRACTION: Final = 16

#: Redis counts time in whole milliseconds: its expiry may fall up to 1 ms
#: before "sent + TTL", so the local deadline is that much earlier.
_MARGIN: Final = 0.001

#: Why entries were dropped, as wksd_near_cache_invalidations_total counts them:
#: a push named the key; FLUSHALL/FLUSHDB; the link was lost (or a new one
#: started); the local deadline passed before Redis's expiry push came.
INVALIDATION_REASONS: Final = ("key", "flush", "connection", "expired")

_FOREVER: Final = float("inf")

#: An entry: (value or None for "absent", deadline on the clock, bytes counted).
_Entry = tuple[bytes | None, float, int]


def tracked_prefixes(keys: KeySpace) -> tuple[str, str, str]:
    """The prefixes the near cache holds: sessions, API-cache values, workflow states.

    None is a prefix of another, as CLIENT TRACKING requires.
    """
    return (keys.session(""), keys.cache_prefix, keys.workflow_prefix)


class _Metrics(Protocol):
    def observe_near_cache(self, cache: NearCache) -> None: ...


class NearCache:
    """A bounded LRU copy of tracked keys, by bytes, kept coherent by pushes."""

    def __init__(
        self,
        max_bytes: int,
        metrics: _Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError("a near cache needs room: max_bytes > 0 (0 means no near cache)")
        self.max_bytes = max_bytes
        self.max_value_bytes = max_bytes // MAX_VALUE_FRACTION
        self.now = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        #: Bytes counted for the entries held now.
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        #: Keys named by invalidation pushes, held here or not: tracking's cost.
        self.pushed_keys = 0
        self.invalidations = dict.fromkeys(INVALIDATION_REASONS, 0)
        if metrics is not None:
            metrics.observe_near_cache(self)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # -- reads --------------------------------------------------------------
    def lookup(self, key: str) -> tuple[bool, bytes | None]:
        """(True, value) on a hit (None: Redis holds no such key), else (False, None)."""
        entry = self._entries.get(key)
        if entry is not None:
            if entry[1] > self.now():
                self._entries.move_to_end(key)
                self.hits += 1
                return True, entry[0]
            self._drop(key)
            self.invalidations["expired"] += 1
        self.misses += 1
        return False, None

    def filled(
        self,
        key: str,
        value: bytes | None,
        pttl: int | None,
        sent_at: float,
    ) -> None:
        """A read's replies: GET's ``value`` and PTTL's ``pttl`` (-1 no TTL, -2 no
        key; None when either was an error), the command sent at ``sent_at``.

        A pair that does not agree (the key expired or appeared between the
        two) or an error caches nothing.
        """
        if value is None and pttl == -2:
            self._put(key, None, _FOREVER)
        elif value is not None and pttl == -1:
            self._put(key, value, _FOREVER)
        elif value is not None and pttl is not None and pttl >= 0:
            self._put_until(key, value, sent_at, pttl)
        else:
            self.forget(key)

    # -- our own writes -----------------------------------------------------------
    def wrote(self, key: str, value: bytes | None, ttl_ms: int | None, sent_at: float) -> None:
        """Our write of ``key`` was applied: now ``value`` (None: deleted), with
        ``ttl_ms`` (None: none) from the command sent at ``sent_at``."""
        if value is None or ttl_ms is None:
            self._put(key, value, _FOREVER)
        else:
            self._put_until(key, value, sent_at, ttl_ms)

    def expire(self, key: str, ttl_ms: int, sent_at: float) -> None:
        """Our PEXPIRE of a key Redis holds was applied: the entry's new deadline."""
        entry = self._entries.get(key)
        if entry is None or entry[0] is None:
            self.forget(key)  # absent here, present there: this copy was never right
        else:
            self._put_until(key, entry[0], sent_at, ttl_ms)

    def forget(self, *keys: str) -> None:
        """Drop these keys' entries (a write whose outcome is not known here)."""
        for key in keys:
            if key in self._entries:
                self._drop(key)

    def clear(self, reason: str = "connection") -> None:
        """Drop every entry."""
        self.invalidations[reason] += len(self._entries)
        self._entries.clear()
        self.bytes = 0

    # -- Redis's pushes -------------------------------------------------------------
    def on_push(self, push: list[Any]) -> None:
        """A RESP3 push: ``[b"invalidate", [keys]]``, or ``[b"invalidate", None]``
        for FLUSHALL/FLUSHDB. Any other push is none of ours."""
        if len(push) != 2 or push[0] != b"invalidate":
            return
        if push[1] is None:
            self.clear("flush")
            return
        self.pushed_keys += len(push[1])
        for raw in push[1]:
            # Our keys went out as UTF-8; bytes that are not cannot be one of them.
            key = raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)
            if key in self._entries:
                self._drop(key)
                self.invalidations["key"] += 1

    # -- internals -------------------------------------------------------------------
    def _put_until(self, key: str, value: bytes, sent_at: float, ttl_ms: int) -> None:
        deadline = sent_at + ttl_ms / 1000 - _MARGIN
        if deadline <= self.now():
            self.forget(key)
        else:
            self._put(key, value, deadline)

    def _put(self, key: str, value: bytes | None, deadline: float) -> None:
        if key in self._entries:
            self._drop(key)
        length = 0 if value is None else len(value)
        if length > self.max_value_bytes:
            return
        size = len(key.encode("utf-8", "surrogateescape")) + length + ENTRY_OVERHEAD
        self._entries[key] = (value, deadline, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, _, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped
            self.evictions += 1

    def _drop(self, key: str) -> None:
        _, _, size = self._entries.pop(key)
        self.bytes -= size
