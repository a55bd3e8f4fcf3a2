"""The in-memory store: the Redis subset wksd needs, with Redis's expiry rules.

Theory of operation
-------------------
Values live in one dict: bytes for strings and counters, a set for sets, a
dict of member -> score for the one sorted set (the finished index). TTLs are
absolute deadlines in ms, from the injected clock.

Expiry is lazy and swept. Every read checks the deadline, so an expired key is
invisible at once. The sweeper frees the memory of keys nobody reads: a heap
of (deadline, key) is popped while its top is due, a slice at a time, with a
checkpoint between slices, so a million keys expiring together never hold the
event loop. Each key has at most one live heap entry (``_scheduled``): a
later deadline is not pushed, the old entry is re-pushed when it comes due,
so a key touched a thousand times a second does not grow the heap.

The store is bounded (``max_keys``). A write that needs a new key when the
store is full first frees expired keys, then evicts the oldest API-cache
entry (``evictable``), then the oldest *clean* key, and only then fails with
``Full``. Composite steps reserve room for every key they will create before
changing anything, so a ``Full`` never leaves half a change behind. Locks,
their tokens and the fencing counter (``protected``) are never evicted; with
``keep_writes`` (behind the failover store) neither is anything written here
directly, API-cache entries included: during an outage it is the only copy.

Clean keys exist when Redis is the backend: the failover store mirrors each
write it makes to Redis here (the ``mirror_*`` methods), so that if Redis goes
away, this host's sessions, workflows and locks are still known. A mirror is
a copy of what Redis holds, so it may be dropped; a write made here during an
outage is the only copy until it is written back, so it may not. Mirrors
never fail with ``Full``: when there is no room, the copy is skipped (a
lock's copy is made even past the bound: knowing who holds a lock is what
keeps a second holder out during an outage).

Durability. Given a ``DurableLog`` (``wksd.store.durable``), every change
is also appended to it as an op: ``["p", key, value, deadline, clean]`` (a
string put), ``["d", key]``, ``["x", key, deadline]``, ``["sa"|"sr", key,
member]``, ``["za", key, member, score]`` / ``["zr", key, member]``,
``["c", key]`` (now clean), ``["v", key]`` (gone at restart: a keepalive
lock), ``["e", id, at, event, expiry]``, and the bulk forms a snapshot uses
(``["S", key, members]``, ``["Z", key, pairs]``, ``["E", id, expiry,
events]``, ``["A", events]``). Deadlines are absolute, so replay (``load``)
needs no clock of the past, and every op states a result rather than a
step (a counter's new value, never "add one"), so replaying an op twice
changes nothing. Expiry itself is not logged: a key whose deadline passed
is skipped at replay. Ops of other owners (the failover journal's, whose
names start with "j") pass through ``record`` and come back from
``take_foreign_ops``.

Nothing here awaits: each operation is atomic with respect to other tasks,
which is exactly what the composite primitives need.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, MutableSet
from collections.abc import Set as AbstractSet
from itertools import islice
from typing import TYPE_CHECKING, Any, Final

import trio

from clientlib.errors import Full

from ..clock import Clock, SystemClock
from ..keys import KeySpace
from .base import (
    EVENTS_IN_ALL,
    EVENTS_PER_EXECUTION,
    EXTENDED,
    NOT_FOUND,
    NOT_OWNER,
    RELEASED,
    LockOutcome,
    WorkflowSnapshot,
    WorkflowSwap,
    WrongType,
    recorded_token,
    token_record,
)

if TYPE_CHECKING:
    from .durable import DurableLog

__all__ = ["SWEEP_SLICE", "MemoryStore"]

#: Keys examined per sweeper slice before yielding to the event loop: about
#: a millisecond of work, so requests wait at most that long behind a sweep.
SWEEP_SLICE: Final = 1000

#: Executions whose event history memory keeps; the longest quiet goes first.
MAX_EVENT_LOGS: Final = 10_000
#: Bytes each of the two histories (per execution, and all) may hold in
#: memory; past it the oldest events go. Events are at most 64 KiB each
#: (wksd.coordination.feeds), so counts alone would allow gigabytes.
EVENT_BYTES_BUDGET: Final = 64 * 1024 * 1024

Value = bytes | MutableSet[str] | dict[str, int]


class MemoryStore:
    """The Store interface in memory, for one key space (``keys``: the seed's
    ``wks:`` prefix unless told otherwise)."""

    def __init__(
        self,
        *,
        keys: KeySpace | None = None,
        clock: Clock | None = None,
        max_keys: int = 1_000_000,
        evictable: Callable[[str], bool] = lambda key: False,
        protected: Callable[[str], bool] = lambda key: False,
        keep_writes: bool = False,
        log: DurableLog | None = None,
    ) -> None:
        self.keys = KeySpace() if keys is None else keys
        self._clock = clock or SystemClock()
        self.max_keys = max_keys
        self._is_evictable = evictable
        self._is_protected = protected
        self.keep_writes = keep_writes
        self._log = log
        self._data: dict[str, Value] = {}
        self._deadlines: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []
        self._scheduled: dict[str, int] = {}
        self._containers: set[str] = set()  # keys holding a set or sorted set
        self._volatile: set[str] = set()  # gone at restart (keepalive locks)
        # Eviction order, oldest first: API-cache entries, then clean copies.
        self._cache_keys: OrderedDict[str, None] = OrderedDict()
        self._clean_keys: OrderedDict[str, None] = OrderedDict()
        # Workflow event histories: per execution, and all (bounded deques).
        self._event_logs: OrderedDict[str, deque[tuple[int, bytes]]] = OrderedDict()
        self._event_expiry: dict[str, int] = {}
        self._log_bytes = 0
        self._all_events: deque[tuple[int, bytes]] = deque()
        self._all_bytes = 0
        self._foreign: list[list[Any]] = []
        self._sources: list[Callable[[], list[list[Any]]]] = []
        #: Keys removed because their TTL ran out (lazily or by the sweeper).
        self.expired = 0
        #: API-cache entries dropped to make room.
        self.evicted = 0

    def __len__(self) -> int:
        """Keys held, counting expired ones the sweeper has not freed yet."""
        return len(self._data)

    @property
    def full(self) -> bool:
        """No room for a new key that must be kept: writes would fail FULL."""
        return len(self._data) >= self.max_keys and not self._cache_keys and not self._clean_keys

    @property
    def durable(self) -> bool:
        return self._log is not None

    # -- the Store interface ---------------------------------------------
    async def get(self, key: str) -> bytes | None:
        return self._string(key, self._now())

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        now = self._now()
        self._reserve((key,), now)
        self._put(key, value, _deadline(now, ttl_ms))

    async def delete(self, key: str) -> bool:
        existed = self._alive(key, self._now()) is not None
        self._remove(key)
        return existed

    async def expire(self, key: str, ttl_ms: int) -> bool:
        now = self._now()
        if self._alive(key, now) is None:
            return False
        self._set_deadline(key, now + ttl_ms)
        return True

    async def get_with_ttl(self, key: str) -> tuple[bytes | None, int | None]:
        now = self._now()
        value = self._string(key, now)
        if value is None:
            return None, None
        deadline = self._deadlines.get(key)
        return value, None if deadline is None else deadline - now

    async def members(self, key: str) -> list[str]:
        return sorted(self._set(key, self._now()))

    async def lock_acquire(self, execution_id: str, owner: str, ttl_ms: int) -> LockOutcome:
        now, keys = self._now(), self.keys
        lock_key, token_key = keys.lock(execution_id), keys.lock_token(execution_id)
        holder = self._string(lock_key, now)
        if holder is not None and holder != owner.encode():
            deadline = self._deadlines.get(lock_key)
            return LockOutcome(
                False,
                holder.decode(errors="replace"),
                None,
                None if deadline is None else deadline - now,
            )
        token = self._held_token(lock_key, token_key, now) if holder is not None else None
        self._reserve((lock_key, token_key, keys.fencing), now)
        if token is None:
            token = self._incr(keys.fencing, now)
        self._put(lock_key, owner.encode(), now + ttl_ms)
        self._put(token_key, token_record(token, owner.encode()), now + ttl_ms)
        return LockOutcome(True, owner, token, ttl_ms)

    async def lock_release(self, execution_id: str, owner: str, token: int | None = None) -> str:
        now = self._now()
        lock_key = self.keys.lock(execution_id)
        status = self._owner_check(lock_key, owner, now)
        token_key = self.keys.lock_token(execution_id)
        held = self._held_token(lock_key, token_key, now)
        if status is None and token is not None and held != token:
            status = NOT_OWNER  # another holding of the same worker
        if status is None:
            self._remove(lock_key)
            self._remove(token_key)
            return RELEASED
        return status

    async def lock_extend(self, execution_id: str, owner: str, ttl_ms: int) -> str:
        now = self._now()
        lock_key, token_key = self.keys.lock(execution_id), self.keys.lock_token(execution_id)
        status = self._owner_check(lock_key, owner, now)
        if status is None:
            held = self._held_token(lock_key, token_key, now) is not None
            self._set_deadline(lock_key, now + ttl_ms)
            if held:  # the token goes on with its holding, and only with it
                self._set_deadline(token_key, now + ttl_ms)
            return EXTENDED
        return status

    def held_token(self, execution_id: str) -> int | None:
        """The fencing token of the lock's current holding, if it has one."""
        lock_key, token_key = self.keys.lock(execution_id), self.keys.lock_token(execution_id)
        return self._held_token(lock_key, token_key, self._now())

    def _held_token(self, lock_key: str, token_key: str, now: int) -> int | None:
        # As the scripts' _HELD_TOKEN: the record names the holder and expires
        # with this very lock (the same deadline), else it is another holding's.
        holder = self._string(lock_key, now)
        if holder is None or self._deadlines.get(token_key) != self._deadlines.get(lock_key):
            return None
        return recorded_token(self._string(token_key, now), holder)

    async def swap_workflow(self, swap: WorkflowSwap) -> bool:
        now = self._now()
        if self._string(self.keys.workflow(swap.execution_id), now) != swap.expected:
            return False
        self._apply_swap(swap, now, clean=False)
        event = swap.event
        if event is not None:  # no one to publish to without Redis
            self.record_event(swap.execution_id, event.raw, event.at_ms, event.retain_ms)
        return True

    def _apply_swap(self, swap: WorkflowSwap, now: int, clean: bool) -> None:
        keys = self.keys
        state_key = keys.workflow(swap.execution_id)
        creates = [state_key] if swap.new is not None else []
        if swap.active:
            creates.append(keys.active)
        elif swap.finished_at is not None:
            creates.append(keys.finished)
        self._reserve(creates, now)
        if swap.new is not None:
            self._put(state_key, swap.new, _deadline(now, swap.ttl_ms), clean)
        if swap.active:
            self._sadd(keys.active, swap.execution_id, now)
            self._zrem(keys.finished, swap.execution_id, now)
        else:
            self._srem(keys.active, swap.execution_id, now)
            if swap.finished_at is not None:
                self._zadd(keys.finished, swap.execution_id, swap.finished_at, now)
                index = self._zset(keys.finished, now)
                for member in [m for m, at in index.items() if at < swap.retain_since]:
                    self._zrem(keys.finished, member, now)
        self._drop_if_empty((keys.active, keys.finished))

    async def workflow_snapshot(self, finished_since: int | None) -> WorkflowSnapshot:
        now, keys = self._now(), self.keys
        active = [
            (execution_id, self._string(keys.workflow(execution_id), now))
            for execution_id in sorted(self._set(keys.active, now))
        ]
        finished = []
        if finished_since is not None:
            for execution_id, at in list(self._zset(keys.finished, now).items()):
                if at >= finished_since:
                    state = self._string(keys.workflow(execution_id), now)
                    if state is not None:
                        finished.append(state)
        return WorkflowSnapshot(active, finished)

    # -- coordination ----------------------------------------------------------
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        now = self._now()
        return [self._string(key, now) for key in keys]

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        now = self._now()
        if self._alive(key, now) is not None:
            return False
        self._reserve((key,), now)
        self._put(key, value, now + ttl_ms)
        return True

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        if self._string(key, self._now()) != value:
            return False
        self._remove(key)
        return True

    async def cache_fill(self, key: str, value: bytes, ttl_ms: int, meta: bytes | None) -> None:
        now = self._now()
        value_key, meta_key = self.keys.cache(key), self.keys.cache_meta(key)
        self._reserve((value_key, meta_key) if meta is not None else (value_key,), now)
        self._fill(value_key, meta_key, value, now + ttl_ms, meta, clean=False)

    def _fill(
        self,
        value_key: str,
        meta_key: str,
        value: bytes,
        deadline: int,
        meta: bytes | None,
        clean: bool,
    ) -> None:
        self._put(value_key, value, deadline, clean)
        if meta is None:
            self._remove(meta_key)
        else:
            self._put(meta_key, meta, deadline, clean)  # the same deadline: bound

    async def cache_lookup(self, key: str) -> tuple[bytes | None, bytes | None]:
        now = self._now()
        value_key, meta_key = self.keys.cache(key), self.keys.cache_meta(key)
        value, meta = self._string(value_key, now), self._string(meta_key, now)
        if value is None or self._deadlines.get(value_key) != self._deadlines.get(meta_key):
            meta = None  # not this value's: written before the value last was
        return value, meta

    async def publish(self, channel: str, message: bytes) -> None:
        return None  # one daemon, no Redis: nobody else to tell

    def record_event(self, execution_id: str, event: bytes, at_ms: int, retain_ms: int) -> None:
        """Append an event to its execution's history and to the all-executions
        one (``swap_workflow`` does, for a swap's event)."""
        expiry = self._now() + retain_ms
        self._append_event(execution_id, at_ms, event, expiry)
        if self._log is not None:
            self._log.append(["e", execution_id, at_ms, event, expiry])

    def _append_event(self, execution_id: str, at_ms: int, event: bytes, expiry: int) -> None:
        log = self._event_logs.pop(execution_id, None) or deque()
        log.append((at_ms, event))
        self._log_bytes += len(event)
        if len(log) > EVENTS_PER_EXECUTION:
            self._log_bytes -= len(log.popleft()[1])
        self._event_logs[execution_id] = log  # most recently active last
        self._event_expiry[execution_id] = expiry
        self._trim_event_logs()
        self._all_events.append((at_ms, event))
        self._all_bytes += len(event)
        self._trim_all_events()

    def _trim_event_logs(self) -> None:
        while len(self._event_logs) > 1 and (
            len(self._event_logs) > MAX_EVENT_LOGS or self._log_bytes > EVENT_BYTES_BUDGET
        ):
            quiet, dropped = self._event_logs.popitem(last=False)  # the longest quiet
            self._event_expiry.pop(quiet, None)
            self._log_bytes -= sum(len(raw) for _, raw in dropped)

    def _trim_all_events(self) -> None:
        while len(self._all_events) > EVENTS_IN_ALL or self._all_bytes > EVENT_BYTES_BUDGET:
            self._all_bytes -= len(self._all_events.popleft()[1])

    async def read_events(self, execution_id: str | None, since_ms: int, limit: int) -> list[bytes]:
        if execution_id is None:
            log: Iterable[tuple[int, bytes]] = self._all_events
        else:
            if self._event_expiry.get(execution_id, 0) <= self._now():
                self._drop_event_log(execution_id)
            log = self._event_logs.get(execution_id, ())
        return [event for at, event in log if at > since_ms][:limit]

    def _drop_event_log(self, execution_id: str) -> None:
        expired = self._event_logs.pop(execution_id, ())
        self._log_bytes -= sum(len(raw) for _, raw in expired)
        self._event_expiry.pop(execution_id, None)

    # -- copies of what Redis holds (see the module docstring) ---------------
    def mirror_set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        now = self._now()
        if self._room_for((key,), now):
            self._put(key, value, _deadline(now, ttl_ms), clean=True)
        else:
            self._remove(key)  # better none than a stale one

    def mirror_cache_fill(self, key: str, value: bytes, ttl_ms: int, meta: bytes | None) -> None:
        """Copy a cache fill Redis applied, value and metadata with one deadline."""
        now = self._now()
        value_key, meta_key = self.keys.cache(key), self.keys.cache_meta(key)
        if self._room_for((value_key, meta_key), now):
            self._fill(value_key, meta_key, value, now + ttl_ms, meta, clean=True)
        else:
            self._remove(value_key)  # better none than a stale one
            self._remove(meta_key)

    def mirror_delete(self, *keys: str) -> None:
        for key in keys:
            self._remove(key)

    def mirror_expire(self, key: str, ttl_ms: int) -> None:
        now = self._now()
        if self._alive(key, now) is not None:
            self._set_deadline(key, now + ttl_ms)

    def mirror_lock(
        self, execution_id: str, holder: str, token: int | None, ttl_ms: int | None
    ) -> None:
        """Copy a lock Redis gave: its holder, its token, and the fencing counter.

        Made even when the store is at its bound (see the module docstring).
        """
        now, keys = self._now(), self.keys
        lock_key, token_key = keys.lock(execution_id), keys.lock_token(execution_id)
        self._room_for((lock_key, token_key, keys.fencing), now)  # best effort
        deadline = _deadline(now, ttl_ms)
        if token is None:
            # The same holder's lock, extended or seen again: its token (if
            # this copy knows it) goes on with it. Another holder's lock ends
            # the record: its token was an earlier holding's.
            held = self._held_token(lock_key, token_key, now)
            if self._string(lock_key, now) != holder.encode():
                self._remove(token_key)
            elif held is not None and deadline is not None:
                self._set_deadline(token_key, deadline)
        self._put(lock_key, holder.encode(), deadline, clean=True)
        if token is not None:
            self._put(token_key, token_record(token, holder.encode()), deadline, clean=True)
            if token > int(self._string(keys.fencing, now) or b"0"):
                # Never a clean copy: evicting the counter would let tokens
                # issued during an outage start again from 1.
                self._put(keys.fencing, str(token).encode(), None)

    def mirror_workflow(self, swap: WorkflowSwap) -> None:
        """Copy a workflow change Redis accepted (whatever this copy held before)."""
        now = self._now()
        try:
            self._apply_swap(swap, now, clean=True)
        except Full:
            self._remove(self.keys.workflow(swap.execution_id))  # better none than a stale one

    def mark_clean(self, *keys: str) -> None:
        """These keys are in Redis now; they may be evicted like any copy."""
        for key in keys:
            if key in self._data and not self._is_set(key):
                self._place(key, clean=True)
                if self._log is not None:
                    self._log.append(["c", key])

    def mark_volatile(self, key: str) -> None:
        """Forget ``key`` at the next start (a lock its connection keeps alive);
        until then it is an ordinary key. A later write or delete unmarks it."""
        if key in self._data:
            self._volatile.add(key)
            if self._log is not None:
                self._log.append(["v", key])

    def _room_for(self, keys: Iterable[str], now: int) -> bool:
        try:
            self._reserve(keys, now)
        except Full:
            return False
        return True

    def _is_set(self, key: str) -> bool:
        # The active set and finished index hold every id; never evicted.
        return not isinstance(self._data.get(key), bytes)

    # -- durability hooks for other parts of the daemon -----------------------
    def record(self, op: list[Any]) -> None:
        """Append ``op`` (a msgpack-able list whose first item is a str naming
        it; names starting with "j" belong to the failover journal) to the
        durable log, in the same frame as the memory changes of the request
        being served. A no-op while the store is not durable."""
        if self._log is not None:
            self._log.append(op)

    def take_foreign_ops(self) -> list[list[Any]]:
        """Ops replayed at start that the memory store does not own (those
        recorded with ``record``), in the order they were recorded; emptied."""
        ops, self._foreign = self._foreign, []
        return ops

    def register_snapshot_source(self, source: Callable[[], list[list[Any]]]) -> None:
        """At compaction, ``source()`` gives the ops that rebuild its owner's
        state (e.g. the failover journal); they are written into the snapshot."""
        self._sources.append(source)

    # -- replay and snapshots (see the module docstring) -----------------------
    def load(self, ops: Iterable[list[Any]]) -> int:
        """Apply replayed ops (without logging them again); the keys held after.

        Volatile keys (keepalive locks) are dropped, and the drop is logged.
        """
        log, self._log = self._log, None
        now = self._now()
        apply = self._apply
        try:
            for op in ops:
                apply(op, now)
            for execution_id, expiry in list(self._event_expiry.items()):
                if expiry <= now:
                    self._drop_event_log(execution_id)
        finally:
            self._log = log
        for key in sorted(self._volatile):
            self._remove(key)
        return len(self._data)

    def _apply(self, op: list[Any], now: int) -> None:
        kind = op[0]
        if kind == "p":
            _, key, value, deadline, clean = op
            if deadline is not None and deadline <= now:
                self._remove(key)
            else:
                self._put(key, value, deadline, clean)
        elif kind == "d":
            self._remove(op[1])
        elif kind == "x":
            key, deadline = op[1], op[2]
            if key in self._data:
                if deadline <= now:
                    self._remove(key)
                else:
                    self._set_deadline(key, deadline)
        elif kind == "sa":
            self._sadd(op[1], op[2], now)
        elif kind == "sr":
            self._srem(op[1], op[2], now)
            self._drop_if_empty((op[1],))
        elif kind == "za":
            self._zadd(op[1], op[2], op[3], now)
        elif kind == "zr":
            self._zrem(op[1], op[2], now)
            self._drop_if_empty((op[1],))
        elif kind == "c":
            if op[1] in self._data and not self._is_set(op[1]):
                self._place(op[1], clean=True)
        elif kind == "v":
            if op[1] in self._data:
                self._volatile.add(op[1])
        elif kind == "e":
            _, execution_id, at_ms, event, expiry = op
            self._append_event(execution_id, at_ms, event, expiry)
        elif kind == "S":
            for member in op[2]:
                self._sadd(op[1], member, now)
        elif kind == "Z":
            for member, score in op[2]:
                self._zadd(op[1], member, score, now)
        elif kind == "E":
            _, execution_id, expiry, events = op
            log = self._event_logs.setdefault(execution_id, deque())
            for at_ms, event in events:
                log.append((at_ms, event))
                self._log_bytes += len(event)
            self._event_expiry[execution_id] = expiry
        elif kind == "A":
            for at_ms, event in op[1]:
                self._all_events.append((at_ms, event))
                self._all_bytes += len(event)
            self._trim_all_events()
        elif kind.startswith("j"):
            self._foreign.append(op)
        else:
            raise ValueError(f"unknown op {kind!r} in the journal")

    def freeze(self) -> Iterator[list[Any]]:
        """Copy the whole state now; the ops that rebuild it, to write at leisure."""
        data = self._data.copy()
        for key in self._containers:
            value = data[key]
            data[key] = dict(value) if isinstance(value, dict) else {*value}
        deadlines = self._deadlines.copy()
        clean = set(self._clean_keys)
        if self.keep_writes:
            clean.update(self._cache_keys)  # there, only clean copies are evictable
        volatile = list(self._volatile)
        logs = [
            (execution_id, self._event_expiry.get(execution_id, 0), list(log))
            for execution_id, log in self._event_logs.items()
        ]
        all_events = list(self._all_events)
        foreign = [op for source in self._sources for op in source()]
        return self._frozen_ops(data, deadlines, clean, volatile, logs, all_events, foreign)

    @staticmethod
    def _frozen_ops(
        data: dict[str, Value],
        deadlines: dict[str, int],
        clean: AbstractSet[str],
        volatile: list[str],
        logs: list[tuple[str, int, list[tuple[int, bytes]]]],
        all_events: list[tuple[int, bytes]],
        foreign: list[list[Any]],
    ) -> Iterator[list[Any]]:
        for key, value in data.items():
            deadline = deadlines.get(key)
            if isinstance(value, bytes):
                yield ["p", key, value, deadline, key in clean]
                continue
            if isinstance(value, dict):
                yield ["Z", key, [[member, score] for member, score in value.items()]]
            else:
                yield ["S", key, sorted(value)]
            if deadline is not None:
                yield ["x", key, deadline]
        for key in volatile:
            yield ["v", key]
        for execution_id, expiry, events in logs:
            yield ["E", execution_id, expiry, [[at, event] for at, event in events]]
        for start in range(0, len(all_events), 1000):
            yield ["A", [[at, event] for at, event in all_events[start : start + 1000]]]
        yield from foreign

    # -- sweeping -----------------------------------------------------------
    def sweep_some(self, limit: int) -> tuple[int, bool]:
        """Free up to ``limit`` due heap entries: (keys freed, more are due)."""
        now = self._now()
        heap = self._heap
        freed = 0
        while heap and heap[0][0] <= now:
            if limit <= 0:
                return freed, True
            limit -= 1
            deadline, key = heapq.heappop(heap)
            if self._scheduled.get(key) != deadline:
                continue  # superseded by an earlier entry for the same key
            del self._scheduled[key]
            actual = self._deadlines.get(key)
            if actual is None:
                continue  # deleted, or no longer has a TTL
            if actual <= now:
                self._remove(key, logged=False)
                self.expired += 1
                freed += 1
            else:
                heapq.heappush(heap, (actual, key))
                self._scheduled[key] = actual
        return freed, False

    async def sweep(self, slice_size: int = SWEEP_SLICE) -> int:
        """Free every expired key, a slice at a time; the number freed."""
        total = 0
        while True:
            freed, more = self.sweep_some(slice_size)
            total += freed
            if not more:
                return total
            await trio.lowlevel.checkpoint()

    # -- internals -------------------------------------------------------
    def _now(self) -> int:
        return int(self._clock.time() * 1000)

    def _alive(self, key: str, now: int) -> Value | None:
        value = self._data.get(key)
        if value is not None:
            deadline = self._deadlines.get(key)
            if deadline is not None and deadline <= now:
                self._remove(key, logged=False)  # replay skips it by its deadline
                self.expired += 1
                return None
        return value

    def _string(self, key: str, now: int) -> bytes | None:
        value = self._alive(key, now)
        if value is not None and not isinstance(value, bytes):
            raise WrongType(f"{key} does not hold a string")
        return value

    def _set(self, key: str, now: int) -> MutableSet[str]:
        value = self._alive(key, now)
        if value is None:
            return set()
        if not isinstance(value, MutableSet):
            raise WrongType(f"{key} does not hold a set")
        return value

    def _sadd(self, key: str, member: str, now: int) -> None:
        value = self._set(key, now)
        if key not in self._data:
            value = self._data[key] = set()
            self._containers.add(key)
        if member not in value:
            value.add(member)
            if self._log is not None:
                self._log.append(["sa", key, member])

    def _srem(self, key: str, member: str, now: int) -> None:
        value = self._set(key, now)
        if member in value:
            value.discard(member)
            if self._log is not None:
                self._log.append(["sr", key, member])

    def _zset(self, key: str, now: int) -> dict[str, int]:
        value = self._alive(key, now)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise WrongType(f"{key} does not hold a sorted set")
        return value

    def _zadd(self, key: str, member: str, score: int, now: int) -> None:
        value = self._zset(key, now)
        if key not in self._data:
            self._data[key] = value
            self._containers.add(key)
        value[member] = score
        if self._log is not None:
            self._log.append(["za", key, member, score])

    def _zrem(self, key: str, member: str, now: int) -> None:
        value = self._zset(key, now)
        if member in value:
            del value[member]
            if self._log is not None:
                self._log.append(["zr", key, member])

    def _drop_if_empty(self, keys: Iterable[str]) -> None:
        # Redis removes a set or sorted set when its last member goes.
        for key in keys:
            if key in self._data and not self._data[key]:
                self._remove(key, logged=False)  # its last member's removal is logged

    def _incr(self, key: str, now: int) -> int:
        value = int(self._string(key, now) or b"0") + 1
        self._put(key, str(value).encode(), None)
        return value

    def _owner_check(self, lock_key: str, owner: str, now: int) -> str | None:
        holder = self._string(lock_key, now)
        if holder is None:
            return NOT_FOUND
        if holder != owner.encode():
            return NOT_OWNER
        return None

    def _put(self, key: str, value: bytes, deadline: int | None, clean: bool = False) -> None:
        """Store a string with an absolute deadline (None: no TTL)."""
        self._data[key] = value
        if deadline is None:
            self._deadlines.pop(key, None)
        else:
            self._schedule(key, deadline)
        self._volatile.discard(key)
        self._place(key, clean)
        if self._log is not None:
            self._log.append(["p", key, value, deadline, clean])

    def _place(self, key: str, clean: bool) -> None:
        """Put ``key`` in its eviction tier (or none: it must be kept)."""
        self._cache_keys.pop(key, None)
        self._clean_keys.pop(key, None)
        if self._is_protected(key):
            return
        if self._is_evictable(key) and (clean or not self.keep_writes):
            self._cache_keys[key] = None
        elif clean:
            self._clean_keys[key] = None

    def _set_deadline(self, key: str, deadline: int) -> None:
        self._schedule(key, deadline)
        if self._log is not None:
            self._log.append(["x", key, deadline])

    def _schedule(self, key: str, deadline: int) -> None:
        self._deadlines[key] = deadline
        scheduled = self._scheduled.get(key)
        if scheduled is None or deadline < scheduled:
            heapq.heappush(self._heap, (deadline, key))
            self._scheduled[key] = deadline

    def _remove(self, key: str, *, logged: bool = True) -> None:
        # The heap entry stays; the sweeper skips it when it comes due.
        if self._data.pop(key, None) is not None and logged and self._log is not None:
            self._log.append(["d", key])
        self._deadlines.pop(key, None)
        self._cache_keys.pop(key, None)
        self._clean_keys.pop(key, None)
        self._containers.discard(key)
        self._volatile.discard(key)

    def _reserve(self, keys: Iterable[str], now: int) -> None:
        """Make room for every key of ``keys`` not yet present, or raise Full."""
        wanted = set(keys)
        missing = [key for key in wanted if self._alive(key, now) is None]
        needed = len(self._data) + len(missing) - self.max_keys
        if needed <= 0 or not missing:  # rewriting keys needs no room, even past the bound
            return
        # Expired keys go first. The sweep may free more than needed, or
        # find stale heap entries only; look again after it either way.
        self.sweep_some(max(needed * 4, SWEEP_SLICE))
        needed = len(self._data) + len(missing) - self.max_keys
        for tier in (self._cache_keys, self._clean_keys):
            if needed <= 0:
                return
            # Oldest first, never a key this write itself uses.
            victims = [key for key in islice(tier, needed + len(wanted)) if key not in wanted]
            for victim in victims[:needed]:
                self._remove(victim)
                self.evicted += 1
                needed -= 1
        if needed > 0:
            raise Full(f"the memory store holds its maximum of {self.max_keys} keys")


def _deadline(now: int, ttl_ms: int | None) -> int | None:
    return None if ttl_ms is None else now + ttl_ms
