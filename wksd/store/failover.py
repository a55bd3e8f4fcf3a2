"""Redis when it answers, memory when it does not, and nothing lost between.

Theory of operation
-------------------
``FailoverStore`` implements the Store interface in front of a ``RedisStore``
and the ``MemoryStore``. While Redis serves, every call goes to Redis and each
write is mirrored into memory as a *clean* copy. When a call finds the link
broken (``LinkDown``: closed, or no reply within ``WKSD_REDIS_TIMEOUT``), that
call and every later one is served from memory, which already knows this
host's sessions, workflows and locks from the mirror. The client sees no
error, only the latency of the timeout at worst.

Writes made in memory during the outage are noted in a ``Journal``, and the
journal goes into the memory store's durable log with the write itself
(``MemoryStore.record``), so an outage not yet written back survives a
restart of the daemon: at start the journal is rebuilt from the log's ops
(``take_foreign_ops``) and at compaction it gives the ops that rebuild it
(``register_snapshot_source``). When a plain key (a session, a cache entry)
is first journaled, the journal also keeps what this host last saw of it: the
memory store's copy just before the outage write, or "absent" when there was
none (never seen, evicted, deleted).

The supervisor task (``run``) reconnects with capped, jittered backoff, forever;
when Redis answers again it writes the journal back with the conflict rules
of DESIGN section 5 (``_restore``), many entries at once over the pipelined
link, while memory keeps serving. Clients that rewrite the same keys would
keep the journal from ever being empty, so once few entries are left a short
final phase begins: new writes wait (reads go on from memory, which is then
exactly current), the last entries go back, Redis takes over, and the waiting
writes go to Redis. The wait is the time to write back those few entries, and
never more than the Redis timeout, since a stalled link breaks and releases it.
Any error in connecting, writing back or pinging, expected or a bug, is
logged, counted (``wksd_supervisor_errors_total`` for the unexpected ones)
and retried after the backoff; memory serves meanwhile and the journal keeps
every entry not yet written back.

Conflict rules (write-back never undoes what another host wrote meanwhile):
a workflow state goes back unless Redis holds one with an ``updatedAt`` as
new or newer, or a finished one while ours is still running (the seed's app
completes a run without touching ``updatedAt``); a session, cache entry or
delete goes back only if Redis still holds what this host last saw (a
compare-and-set in Lua); a lock goes back unless Redis gave it to someone
else, whose it stays; the fencing counter is raised to the highest token
memory issued. When Redis's value stays, memory takes a copy of it. Every
outcome is counted (``wksd_reconciled_keys_total``) and conflicts are logged.

A write Redis applied is answered as a success even if copying it into
memory fails: the copy of that key is dropped instead (``_mirror``). With
``WKSD_LOCKS_FAIL_CLOSED`` an outage refuses ``lock.acquire`` and
``lock.extend`` (``Unavailable``), so a lock held through it expires at the
deadline Redis last confirmed; releases go on and are written back.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import structlog
import trio
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from clientlib.errors import Unavailable

from ..domain.values import MAX_SAFE_INTEGER
from ..keys import KeySpace
from ..metrics import Metrics
from .base import LockOutcome, Store, WorkflowSnapshot, WorkflowSwap
from .memory import MemoryStore
from .redis import RedisStore
from .redis_link import LinkDown, RedisLink
from .redis_target import RedisTarget, TooOld, WrongRole, open_link

__all__ = ["FailoverStore", "Journal"]

log = structlog.get_logger("wksd.redis")

T = TypeVar("T")

#: Seconds between health PINGs on an idle link: a Redis that died quietly
#: is noticed this soon even when no request is running.
PING_INTERVAL: Final = 2.0
#: Connection attempts at start before wksd says it is serving from memory.
START_RETRIES: Final = 3
#: Backoff before those first retries: 0.2 s, 0.4 s, 0.8 s.
_START_BACKOFF: Final = ExponentialBackoff(cap=1.0, base=0.1)
#: Journal entries written back at once: enough to fill the pipeline, few
#: enough that the requests being served meanwhile still get their turn.
RESTORE_CONCURRENCY: Final = 64
#: With this many entries or fewer left, writes pause for the final phase.
#: Written back at RESTORE_CONCURRENCY at a time, that is milliseconds.
FINAL_PHASE_ENTRIES: Final = 512
#: Passes over the journal while writes go on. Clients rewriting more keys
#: than a pass can keep up with would otherwise keep Redis out for ever; after
#: this many passes the final phase begins however much is left.
MAX_OPEN_PASSES: Final = 8


class _Unset(enum.Enum):
    UNSET = "unset"


#: ``Journal.note``'s base when the entry's kind compares against none
#: (workflows, locks and the fencing counter have rules of their own).
NO_BASE: Final = _Unset.UNSET

#: What a plain key's write-back compares against: the value this host last
#: saw, None for "absent".
Base = bytes | None


def _no_record(op: list[Any]) -> None:
    return None


class Journal:
    """What memory changed while Redis was away: (kind, name) -> version.

    A version, not a flag: if the same key changes again while it is being
    written back, the newer change must not be forgotten when the older one
    is settled. A plain key's entry also keeps its *base*, what this host last
    saw of the key before the outage (``base``).

    Every change is also handed to ``record`` as an op, a msgpack-able list:
    ``["jn", kind, name]`` or ``["jn", kind, name, base]`` (note),
    ``["jb", kind, name, base]`` (rebase), ``["ja", kind, name, value]`` (Redis
    may hold that instead: ``also_seen``), ``["js", kind, name]`` (settle),
    ``["jo", execution_id, owner]`` (a lock's owner). ``apply`` rebuilds the
    journal from them, and ``snapshot`` gives the ops that rebuild it now.
    """

    def __init__(self, record: Callable[[list[Any]], None] = _no_record) -> None:
        self._entries: dict[tuple[str, str], int] = {}
        self._bases: dict[tuple[str, str], Base] = {}
        # Values Redis may hold instead of the base: writes that were in
        # flight to Redis when the link broke may still be applied there.
        self._alternates: dict[tuple[str, str], list[Base]] = {}
        self._owners: dict[str, str] = {}
        self._version = 0
        self._record = record

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, kind: str, name: str, base: Base | _Unset = NO_BASE) -> None:
        """Journal a change; ``base`` counts only when the entry is new."""
        self._record(["jn", kind, name] if base is NO_BASE else ["jn", kind, name, base])
        self._note(kind, name, base)

    def note_owner(self, execution_id: str, owner: str) -> None:
        """The worker whose lock on ``execution_id`` changed, for its write-back."""
        self._record(["jo", execution_id, owner])
        self._owners[execution_id] = owner

    def owner(self, execution_id: str) -> str:
        return self._owners.get(execution_id, "")

    def base(self, kind: str, name: str) -> Base:
        """What this host last saw of the entry's key (None: absent)."""
        return self._bases.get((kind, name))

    def rebase(self, kind: str, name: str, base: Base) -> None:
        """Redis holds ``base`` now (written back while the entry changed again)."""
        if (kind, name) in self._entries:
            self._record(["jb", kind, name, base])
            self._bases[(kind, name)] = base
            self._alternates.pop((kind, name), None)

    def also_seen(self, kind: str, name: str, value: Base) -> None:
        """Redis may hold ``value`` instead of the base: a write of it was in
        flight when the link broke, and a Redis that only paused applies it
        when it resumes. The write-back accepts either."""
        if (kind, name) in self._entries:
            self._record(["ja", kind, name, value])
            self._alternates.setdefault((kind, name), []).append(value)

    def alternates(self, kind: str, name: str) -> list[Base]:
        return self._alternates.get((kind, name), [])

    def pending(self) -> list[tuple[str, str, int]]:
        return [(kind, name, version) for (kind, name), version in self._entries.items()]

    def settle(self, kind: str, name: str, version: int) -> bool:
        """Forget an entry written back, unless it changed again since."""
        if self._entries.get((kind, name)) != version:
            return False
        self._record(["js", kind, name])
        self._settle(kind, name)
        return True

    def apply(self, op: list[Any]) -> None:
        """Rebuild state from one recorded op (nothing is recorded again)."""
        match op:
            case ["jn", str(kind), str(name)]:
                self._note(kind, name, NO_BASE)
            case ["jn", str(kind), str(name), bytes() | None as base]:
                self._note(kind, name, base)
            case ["jb", str(kind), str(name), bytes() | None as base]:
                if (kind, name) in self._entries:
                    self._bases[(kind, name)] = base
                    self._alternates.pop((kind, name), None)
            case ["ja", str(kind), str(name), bytes() | None as value]:
                if (kind, name) in self._entries:
                    self._alternates.setdefault((kind, name), []).append(value)
            case ["js", str(kind), str(name)]:
                self._settle(kind, name)
            case ["jo", str(execution_id), str(owner)]:
                self._owners[execution_id] = owner
            case _:
                raise ValueError(f"not a journal op: {op[:1]!r}")

    def snapshot(self) -> list[list[Any]]:
        """Ops that rebuild the journal as it is now, entries in their order."""
        ops: list[list[Any]] = [["jo", eid, owner] for eid, owner in self._owners.items()]
        for kind, name in self._entries:
            if (kind, name) in self._bases:
                ops.append(["jn", kind, name, self._bases[(kind, name)]])
            else:
                ops.append(["jn", kind, name])
            ops.extend(["ja", kind, name, value] for value in self.alternates(kind, name))
        return ops

    def _note(self, kind: str, name: str, base: Base | _Unset) -> None:
        entry = (kind, name)
        if entry not in self._entries and base is not NO_BASE:
            self._bases[entry] = base
        self._version += 1
        self._entries[entry] = self._version

    def _settle(self, kind: str, name: str) -> None:
        self._entries.pop((kind, name), None)
        self._bases.pop((kind, name), None)
        self._alternates.pop((kind, name), None)
        if kind == "lock":
            self._owners.pop(name, None)


class FailoverStore:
    def __init__(
        self,
        memory: MemoryStore,
        target: RedisTarget,
        keys: KeySpace,
        metrics: Metrics,
        *,
        timeout: float,
        backoff_max: float = 5.0,
        locks_fail_closed: bool = False,
    ) -> None:
        self._memory = memory
        self._target = target
        self._keys = keys
        self._metrics = metrics
        self._timeout = timeout
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_max, base=0.25)
        self._locks_fail_closed = locks_fail_closed
        self._redis: RedisStore | None = None
        self._link: RedisLink | None = None
        self._journal = Journal(memory.record)
        for op in memory.take_foreign_ops():  # the outage a restart interrupted
            if op and isinstance(op[0], str) and op[0].startswith("j"):
                self._journal.apply(op)
            else:
                log.warning("ignoring an unknown op in the durable log", op=str(op[:1])[:32])
        memory.register_snapshot_source(self._journal.snapshot)
        #: up (connected), down (cannot reach it), error (reached, but refused us).
        self.redis_status = "down"
        self._listeners: list[Callable[[str], None]] = []
        self._backend_changed = trio.Event()
        self._switching: trio.Event | None = None  # not None while writes wait (final phase)
        self._first_attempt = trio.Event()
        self._counts: dict[str, int] = {}
        self._task = "reconnect"  # what the supervisor is doing, for its error counter
        metrics.set_backend("memory")
        if self._journal:
            log.info("outage writes from before the restart", pending_writes=len(self._journal))

    # -- state ------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return "memory" if self._redis is None else "redis"

    @property
    def pending_writes(self) -> int:
        """Outage writes not yet written back to Redis."""
        return len(self._journal)

    def on_backend_change(self, listener: Callable[[str], None]) -> None:
        """Call ``listener("redis"|"memory")`` whenever the serving backend changes."""
        self._listeners.append(listener)

    async def ping(self) -> tuple[str, float | None]:
        """One PING: ("up", latency in ms), or the status when it cannot be sent."""
        link = self._link
        if link is None or link.broken:
            return self.redis_status, None
        started = trio.current_time()
        try:
            await link.execute("PING")
        except LinkDown:
            return "down", None
        except ResponseError:
            return "error", None
        return "up", round((trio.current_time() - started) * 1000, 3)

    async def wait_first_attempt(self) -> None:
        """Return once the first connection attempt succeeded or failed."""
        await self._first_attempt.wait()

    async def wait_for_backend(self, backend: str) -> None:
        """Return once ``backend`` ("redis" or "memory") is the one serving."""
        while self.backend != backend:
            await self._backend_changed.wait()

    def _switch(self, redis: RedisStore | None) -> None:
        self._redis = redis
        backend = self.backend
        self._metrics.set_backend(backend)
        self._backend_changed.set()
        self._backend_changed = trio.Event()
        for listener in self._listeners:
            listener(backend)

    def _lost(self, redis: RedisStore, reason: LinkDown) -> None:
        """A call found the link broken: serve from memory from now on."""
        if self._redis is redis:
            log.warning("redis lost; serving from memory", error=str(reason))
            self.redis_status = "down"
            self._metrics.redis_connection_status.set(0)
            self._switch(None)

    async def _reader(self) -> RedisStore | None:
        """Where a read goes: Redis, or memory (None).

        While the first connection attempt is under way a request waits for it
        (at most twice the timeout) instead of taking memory's word: at start
        memory knows nothing, and a lock granted there would be local only.
        """
        if self._redis is None and not self._first_attempt.is_set():
            with trio.move_on_after(2 * self._timeout):
                await self._first_attempt.wait()
        return self._redis

    async def _writer(self) -> RedisStore | None:
        """Where a write goes: as ``_reader``, and it also waits out a final phase."""
        redis = await self._reader()
        while redis is None and self._switching is not None:
            await self._switching.wait()
            redis = self._redis
        return redis

    # -- routing -------------------------------------------------------------------
    async def _read(self, step: Callable[[Store], Awaitable[T]]) -> T:
        """Run a read on Redis while it serves, else (or if the link breaks) on memory."""
        result, _ = await self._on_either(await self._reader(), step)
        return result

    async def _write(self, step: Callable[[Store], Awaitable[T]]) -> tuple[T, bool]:
        """As ``_read``, for a write; also whether Redis took it (so the caller
        mirrors it into memory) or memory did (so the caller journals it)."""
        return await self._on_either(await self._writer(), step)

    async def _on_either(
        self, redis: RedisStore | None, step: Callable[[Store], Awaitable[T]]
    ) -> tuple[T, bool]:
        if redis is not None:
            try:
                return await step(redis), True
            except LinkDown as exc:
                self._lost(redis, exc)
        return await step(self._memory), False

    # -- the Store interface -----------------------------------------------------
    async def get(self, key: str) -> bytes | None:
        return await self._read(lambda store: store.get(key))

    async def get_with_ttl(self, key: str) -> tuple[bytes | None, int | None]:
        return await self._read(lambda store: store.get_with_ttl(key))

    async def members(self, key: str) -> list[str]:
        return await self._read(lambda store: store.members(key))

    async def workflow_snapshot(
        self, keys: KeySpace, finished_since: int | None
    ) -> WorkflowSnapshot:
        return await self._read(lambda store: store.workflow_snapshot(keys, finished_since))

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        _, by_redis = await self._write_plain(
            key, lambda store: store.set(key, value, ttl_ms), lambda _: True, in_flight=value
        )
        if by_redis:
            self._mirror(lambda: self._memory.mirror_set(key, value, ttl_ms), key)

    async def delete(self, key: str) -> bool:
        # A delete goes back too, known here or not.
        existed, by_redis = await self._write_plain(
            key, lambda store: store.delete(key), lambda _: True, in_flight=None
        )
        if by_redis:
            self._mirror(lambda: self._memory.mirror_delete(key), key)
        return existed

    async def expire(self, key: str, ttl_ms: int) -> bool:
        existed, by_redis = await self._write_plain(
            key, lambda store: store.expire(key, ttl_ms), lambda existed: existed
        )
        if by_redis:
            self._mirror(lambda: self._memory.mirror_expire(key, ttl_ms), key)
        return existed

    async def cache_lookup(self, keys: KeySpace, key: str) -> tuple[bytes | None, bytes | None]:
        return await self._read(lambda store: store.cache_lookup(keys, key))

    async def cache_fill(
        self, keys: KeySpace, key: str, value: bytes, ttl_ms: int, meta: bytes | None
    ) -> None:
        """Both keys are plain keys to the journal. Written back one by one after
        an outage, they get expiries of their own in Redis, so the metadata no
        longer counts there: the value stays fresh until it expires."""
        value_key, meta_key = keys.cache(key), keys.cache_meta(key)
        tried_redis = False

        async def routed(store: Store) -> None:
            nonlocal tried_redis
            if store is not self._memory:
                tried_redis = True
                return await store.cache_fill(keys, key, value, ttl_ms, meta)
            # No checkpoint from here to the notes: nothing else runs between.
            seen = [await self._memory.get(value_key), await self._memory.get(meta_key)]
            await store.cache_fill(keys, key, value, ttl_ms, meta)
            for name, base, ours in ((value_key, seen[0], value), (meta_key, seen[1], meta)):
                self._journal.note("key", name, base)
                if tried_redis:
                    self._journal.also_seen("key", name, ours)
            return None

        _, by_redis = await self._write(routed)
        if by_redis:
            self._mirror(
                lambda: self._memory.mirror_cache_fill(keys, key, value, ttl_ms, meta),
                value_key,
                meta_key,
            )

    async def _write_plain(
        self,
        key: str,
        step: Callable[[Store], Awaitable[T]],
        changed: Callable[[T], bool],
        in_flight: Base | _Unset = NO_BASE,
    ) -> tuple[T, bool]:
        """``_write`` for a plain key; in memory, a change (``changed``) is journaled
        with what this host last saw of the key just before it.

        ``in_flight`` is what Redis holds if this very write, sent to Redis
        when the link broke, is applied there after all (a paused Redis runs
        what it had read when it resumes): the write-back accepts it too.
        """
        tried_redis = False

        async def routed(store: Store) -> T:
            nonlocal tried_redis
            if store is not self._memory:
                tried_redis = True
                return await step(store)
            # No checkpoint from here to the note: nothing else runs between.
            seen = await self._memory.get(key)
            result = await step(store)
            if changed(result):
                self._journal.note("key", key, seen)
                if tried_redis and in_flight is not NO_BASE:
                    self._journal.also_seen("key", key, in_flight)
            return result

        return await self._write(routed)

    async def lock_acquire(
        self, keys: KeySpace, execution_id: str, owner: str, ttl_ms: int
    ) -> LockOutcome:
        def acquire(store: Store) -> Awaitable[LockOutcome]:
            if store is self._memory and self._locks_fail_closed:
                raise Unavailable("Redis is down and WKSD_LOCKS_FAIL_CLOSED is set")
            return store.lock_acquire(keys, execution_id, owner, ttl_ms)

        outcome, by_redis = await self._write(acquire)
        if by_redis:
            # Mirror the holder either way: during an outage this host still
            # knows the lock is taken, and by whom.
            assert outcome.holder is not None
            holder = outcome.holder
            self._mirror(
                lambda: self._memory.mirror_lock(
                    keys, execution_id, holder, outcome.token, outcome.ttl_ms
                ),
                keys.lock(execution_id),
                keys.lock_token(execution_id),
            )
        elif outcome.acquired:
            self._note_lock(execution_id, owner)
            self._journal.note("fencing", keys.fencing)
        return outcome

    async def lock_release(
        self, keys: KeySpace, execution_id: str, owner: str, token: int | None = None
    ) -> str:
        status, by_redis = await self._write(
            lambda store: store.lock_release(keys, execution_id, owner, token)
        )
        if status != "not_owner":
            lock_key, token_key = keys.lock(execution_id), keys.lock_token(execution_id)
            if by_redis:
                self._mirror(lambda: self._memory.mirror_delete(lock_key, token_key), lock_key)
            else:
                # Released here, or unknown here but perhaps held in Redis by
                # this owner: either way the release goes back.
                self._note_lock(execution_id, owner)
        return status

    async def lock_extend(self, keys: KeySpace, execution_id: str, owner: str, ttl_ms: int) -> str:
        def extend(store: Store) -> Awaitable[str]:
            if store is self._memory and self._locks_fail_closed:
                # Never past the expiry Redis last confirmed: the memory copy
                # keeps that deadline, and the holder is told when it passes.
                raise Unavailable("Redis is down and WKSD_LOCKS_FAIL_CLOSED is set")
            return store.lock_extend(keys, execution_id, owner, ttl_ms)

        status, by_redis = await self._write(extend)
        if status == "extended":
            if by_redis:
                lock_key, token_key = keys.lock(execution_id), keys.lock_token(execution_id)
                # The token goes on with the lock if memory knows it for this holding.
                self._mirror(
                    lambda: self._memory.mirror_lock(keys, execution_id, owner, None, ttl_ms),
                    lock_key,
                    token_key,
                )
            else:
                self._note_lock(execution_id, owner)
        return status

    async def swap_workflow(self, keys: KeySpace, swap: WorkflowSwap) -> bool:
        done, by_redis = await self._write(lambda store: store.swap_workflow(keys, swap))
        if done:
            if by_redis:
                self._mirror(
                    lambda: self._memory.mirror_workflow(keys, swap),
                    keys.workflow(swap.execution_id),
                )
            else:
                self._journal.note("workflow", swap.execution_id)
        return done

    def _mirror(self, copy: Callable[[], None], *keys: str) -> None:
        """Copy into memory a write Redis applied. Redis's answer stands whatever
        happens here: if the copy fails, the (now stale) copy of ``keys`` goes."""
        try:
            copy()
        except Exception:
            log.exception("copying a write into memory failed; dropping that copy")
            self._metrics.supervisor_errors.labels("mirror").inc()
            try:
                self._memory.mirror_delete(*keys)
            except Exception:
                log.exception("dropping a memory copy failed")

    # -- coordination: routed, never journaled ---------------------------------
    # Leases and pub/sub are about this moment, and event history written
    # during an outage stays in this daemon's memory (README, Decisions).
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self._read(lambda store: store.get_many(keys))

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        created, _ = await self._write(lambda store: store.set_if_absent(key, value, ttl_ms))
        return created

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        deleted, _ = await self._write(lambda store: store.delete_if_equal(key, value))
        return deleted

    async def publish(self, channel: str, message: bytes) -> None:
        redis = self._redis  # no point waiting: a message now or never
        if redis is not None:
            await self._on_either(redis, lambda store: store.publish(channel, message))

    async def record_event(
        self, keys: KeySpace, execution_id: str, event: bytes, at_ms: int, retain_ms: int
    ) -> None:
        await self._write(
            lambda store: store.record_event(keys, execution_id, event, at_ms, retain_ms)
        )

    async def read_events(
        self, keys: KeySpace, execution_id: str | None, since_ms: int, limit: int
    ) -> list[bytes]:
        return await self._read(
            lambda store: store.read_events(keys, execution_id, since_ms, limit)
        )

    def _note_lock(self, execution_id: str, owner: str) -> None:
        self._journal.note_owner(execution_id, owner)
        self._journal.note("lock", execution_id)

    # -- the supervisor ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, write back, serve, and reconnect after every failure, forever.

        No error ends it: one it does not expect (a bug in the write-back, say)
        is logged with its traceback, counted, and retried after the backoff.
        """
        task_status.started()
        failures = 0
        while True:
            served = False
            self._task = "reconnect"
            try:
                async with trio.open_nursery() as nursery:
                    try:
                        link = await open_link(self._target, self._timeout, nursery, self._metrics)
                        self._link = link
                        served = await self._serve(link, nursery)
                    except (RedisError, OSError) as exc:
                        self._failed(exc, failures)
                    nursery.cancel_scope.cancel()
            except Exception as exc:  # a supervisor outlives any bug; Cancelled still ends it
                self._crashed(exc, self._task)
            self._first_attempt.set()
            self._link = None
            failures = 0 if served else failures + 1
            if failures == START_RETRIES + 1 and not served:
                log.warning(
                    "redis unavailable; serving from memory and retrying",
                    target=self._target.describe(),
                )
            if failures <= START_RETRIES:
                delay = _START_BACKOFF.compute(failures)
            else:
                delay = self._backoff.compute(failures - START_RETRIES)
            await trio.sleep(delay)

    async def _serve(self, link: RedisLink, nursery: trio.Nursery) -> bool:
        """Write back the outage, switch to Redis, and serve until the link breaks."""
        redis = RedisStore(link)
        await redis.load_scripts()
        self.redis_status = "up"
        self._metrics.redis_connection_status.set(1)
        log.info(
            "redis connected", target=self._target.describe(), pending_writes=len(self._journal)
        )
        self._task = "write_back"
        await self._reconcile_and_switch(redis)
        self._task = "reconnect"
        self._first_attempt.set()
        self._metrics.redis_reconnects.inc()
        log.info("redis serving")
        nursery.start_soon(self._ping_forever, link)
        reason = await link.wait_broken()
        self._lost(redis, reason)
        return True

    def _crashed(self, exc: Exception, task: str) -> None:
        """An error nobody expected: log it whole, count it, serve from memory."""
        if isinstance(exc, ExceptionGroup) and len(exc.exceptions) == 1:
            inner = exc.exceptions[0]  # the nursery's wrapping says nothing
            if isinstance(inner, Exception):
                exc = inner
        self._metrics.supervisor_errors.labels(task).inc()
        self.redis_status = "error"
        self._metrics.redis_connection_status.set(0)
        if self._redis is not None:
            self._switch(None)
        log.error(
            "redis supervisor failed; serving from memory and retrying",
            task=task,
            pending_writes=len(self._journal),
            exc_info=exc,
        )

    def _failed(self, exc: BaseException, failures: int) -> None:
        refused = isinstance(exc, (AuthenticationError, WrongRole, TooOld, ResponseError))
        self.redis_status = "error" if refused else "down"
        self._metrics.redis_connection_status.set(0)
        if self._redis is not None:  # lost during reconciliation or serving
            self._switch(None)
        log_at = log.warning if refused or failures == 0 else log.info
        log_at(
            "redis connection failed",
            target=self._target.describe(),
            error=str(exc),
            status=self.redis_status,
        )

    async def _ping_forever(self, link: RedisLink) -> None:
        while not link.broken:
            await trio.sleep(PING_INTERVAL)
            try:
                await link.execute("PING")
            except LinkDown:
                return  # the link is broken; run() reconnects
            except ResponseError as exc:
                link.fail(exc)
                return
            except Exception:  # not the link's fault as far as we know: ping again
                log.exception("redis health ping failed")
                self._metrics.supervisor_errors.labels("ping").inc()

    # -- reconciliation ----------------------------------------------------------------
    async def _reconcile_and_switch(self, redis: RedisStore) -> None:
        """Write the journal back, then let Redis serve (see the module docstring)."""
        self._counts = {"written": 0, "conflict": 0}
        for _ in range(MAX_OPEN_PASSES):
            if len(self._journal) <= FINAL_PHASE_ENTRIES:
                break
            await self._restore_all(redis, self._journal.pending())
        self._switching = trio.Event()
        try:
            while pending := self._journal.pending():  # only entries from before the pause
                await self._restore_all(redis, pending)
            self._switch(redis)
        finally:
            self._switching.set()
            self._switching = None
        if self._counts["written"] or self._counts["conflict"]:
            log.info("outage writes reconciled", **self._counts)

    async def _restore_all(self, redis: RedisStore, pending: list[tuple[str, str, int]]) -> None:
        """Write back ``pending`` entries, several at once; the first error is raised.

        An entry that fails stays in the journal, to go back on the next try.
        """
        limiter = trio.CapacityLimiter(RESTORE_CONCURRENCY)
        failures: list[Exception] = []

        async def restore(kind: str, name: str, version: int) -> None:
            async with limiter:
                try:
                    outcome, finish = await self._restore(redis, kind, name)
                except Exception as exc:
                    failures.append(exc)
                    nursery.cancel_scope.cancel()
                    return
            self._metrics.reconciled_keys.labels(outcome).inc()
            if outcome == "conflict":
                self._counts["conflict"] += 1
                log.warning("reconcile conflict; Redis's value kept", kind=kind)
            else:
                self._counts["written"] += 1
            finish(self._journal.settle(kind, name, version))

        async with trio.open_nursery() as nursery:
            for entry in pending:
                nursery.start_soon(restore, *entry)
        if failures:
            raise failures[0]

    async def _restore(
        self, redis: RedisStore, kind: str, name: str
    ) -> tuple[str, Callable[[bool], None]]:
        """Write one journal entry back: its outcome, and what to do to memory
        once the entry is settled (called with True) or found changed again."""
        memory, keys = self._memory, self._keys
        if kind == "key":
            value, ttl = await memory.get_with_ttl(name)
            restored = await redis.restore_plain(
                name,
                self._journal.base(kind, name),
                value,
                ttl,
                also_seen=self._journal.alternates(kind, name),
            )

            def finish_key(settled: bool) -> None:
                if restored.outcome == "conflict":
                    if settled:  # memory copies what Redis kept
                        self._copy(name, restored.current, restored.ttl_ms)
                elif settled:
                    memory.mark_clean(name)
                else:  # changed again meanwhile: the next try compares with ours
                    self._journal.rebase(kind, name, value)

            return restored.outcome, finish_key
        if kind == "fencing":
            token = int(await memory.get(name) or b"0")
            await redis.raise_counter(name, token)
            return "written", _nothing
        if kind == "lock":
            lock_key, token_key = keys.lock(name), keys.lock_token(name)
            holder, ttl = await memory.get_with_ttl(lock_key)
            if holder is None:
                status = await redis.lock_release(keys, name, self._journal.owner(name))
                return ("deleted" if status == "released" else "kept"), _nothing
            # 0: memory knows no token of this holding; Redis's next acquire
            # gives one.
            token = memory.held_token(keys, name) or 0
            outcome = await redis.restore_lock(
                keys, name, holder.decode(), ttl if ttl is not None else 1, token
            )
            return (
                outcome,
                lambda settled: memory.mark_clean(lock_key, token_key) if settled else None,
            )
        # kind == "workflow"
        state_key = keys.workflow(name)
        raw, ttl = await memory.get_with_ttl(state_key)
        if raw is None:
            return await redis.retire_workflow(keys, name), _nothing
        finished, updated_at, completed_at = _state_times(raw)
        restored = await redis.restore_workflow(
            keys,
            name,
            raw,
            ttl,
            updated_at,
            active=name in await memory.members(keys.active),
            finished_at=completed_at if finished else None,
            finished=finished,
        )

        def finish_workflow(settled: bool) -> None:
            if not settled:
                return
            if restored.outcome != "conflict":
                memory.mark_clean(state_key)
                return
            current = restored.current
            copy = WorkflowSwap(name, None, current, restored.ttl_ms, active=restored.active)
            self._mirror(lambda: memory.mirror_workflow(keys, copy), state_key)

        return restored.outcome, finish_workflow

    def _copy(self, key: str, value: bytes | None, ttl_ms: int | None) -> None:
        """Make memory's copy of ``key`` what Redis holds."""
        if value is None:
            self._mirror(lambda: self._memory.mirror_delete(key), key)
        else:
            self._mirror(lambda: self._memory.mirror_set(key, value, ttl_ms), key)


def _nothing(settled: bool) -> None:
    return None


def _state_times(raw: bytes) -> tuple[bool, int, int | None]:
    """Whether a stored workflow state is finished, its updatedAt (0 if it has
    none), and its completedAt; read whatever shape the state has (the seed's
    app may have written it, DESIGN 3.1), never raising."""
    try:
        state = json.loads(raw)
    except (ValueError, RecursionError):
        state = None
    if not isinstance(state, dict):
        return False, 0, None
    status = state.get("status")
    finished = isinstance(status, str) and status in ("completed", "failed", "cancelled")
    return finished, _time(state.get("updatedAt")) or 0, _time(state.get("completedAt"))


def _time(value: Any) -> int | None:
    """A stored time in ms: a number within JavaScript's safe integers, else None."""
    if type(value) in (int, float) and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return int(value)
    return None
