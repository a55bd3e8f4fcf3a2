"""Redis when it answers, memory when it does not, and nothing lost between.

Theory of operation
-------------------
``FailoverStore`` implements the Store interface in front of a ``RedisStore``
and the ``MemoryStore``, for the memory store's key space. While Redis
serves, every call goes to Redis and each write is mirrored into memory as a
*clean* copy. When a call finds the link broken (``LinkDown``: closed, or no
reply within ``WKSD_REDIS_TIMEOUT``), that call and every later one is served
from memory, which already knows this host's sessions, workflows and locks
from the mirror. The client sees no error, only the latency of the timeout
at worst.

Each write memory serves is noted in the outage ``Journal``
(``wksd.store.reconcile``) together with what its write-back will need, all
known at that moment: for a plain key (a session, a cache entry) the memory
copy just before the write (``_write_plain``), for a lock its owner, for a
workflow the swap's stamp. Coordination keys (leases), pub/sub and event
history are routed but never journaled: they are about this moment.

The supervisor task (``run``) reconnects with capped, jittered backoff,
forever; when Redis answers again the ``Reconciler`` writes the journal back
(the conflict rules are its module's) while memory keeps serving, then
switches to Redis in a short final phase during which writes wait
(``_writer``). Any error in connecting, writing back or pinging, expected or
a bug, is logged, counted (``wksd_supervisor_errors_total`` for the
unexpected ones) and retried after the backoff; memory serves meanwhile and
the journal keeps every entry not yet written back. An idle link is PINGed
(``PING_INTERVAL``) so a Redis that died quietly is noticed.

A write Redis applied is answered as a success even if copying it into
memory fails: the copy of that key is dropped instead (``_mirror``). With
``WKSD_LOCKS_FAIL_CLOSED`` an outage refuses ``lock.acquire`` and
``lock.extend`` (``Unavailable``), so a lock held through it expires at the
deadline Redis last confirmed; releases go on and are written back.

With a near cache (``near_cache_bytes``) every link is opened with its
tracking, and the one ``NearCache`` is emptied whenever the link it was
coherent with is gone: when a new link starts, when memory takes over
(``_switch``), and by any read that finds the link broken first
(``RedisStore.get``). The write-back after an outage goes through
``RedisStore.restore_*``, which drop the keys they write.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import structlog
import trio
from redis.backoff import ExponentialBackoff, ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, RedisError, ResponseError

from clientlib.errors import Unavailable

from ..keys import KeySpace
from ..metrics import Metrics
from .base import LockOutcome, Store, WorkflowSnapshot, WorkflowSwap
from .memory import MemoryStore
from .near_cache import NearCache, tracked_prefixes
from .reconcile import NO_BASE, BaseOrUnset, Reconciler, open_journal
from .redis import RedisStore
from .redis_link import LinkDown, RedisLink
from .redis_target import RedisTarget, TooOld, WrongRole, open_link

__all__ = ["FailoverStore"]

log = structlog.get_logger("wksd.redis")

T = TypeVar("T")

#: Seconds between health PINGs on an idle link: a Redis that died quietly
#: is noticed this soon even when no request is running.
PING_INTERVAL: Final = 2.0
#: Connection attempts at start before wksd says it is serving from memory.
START_RETRIES: Final = 3
#: Backoff before those first retries: 0.2 s, 0.4 s, 0.8 s.
_START_BACKOFF: Final = ExponentialBackoff(cap=1.0, base=0.1)


class FailoverStore:
    """The Store interface over Redis or memory, for ``memory``'s key space."""

    def __init__(
        self,
        memory: MemoryStore,
        target: RedisTarget,
        metrics: Metrics,
        *,
        timeout: float,
        backoff_max: float = 5.0,
        locks_fail_closed: bool = False,
        near_cache_bytes: int = 0,
    ) -> None:
        self._memory = memory
        self._target = target
        self._keys = memory.keys
        self._metrics = metrics
        self._timeout = timeout
        self._backoff = ExponentialWithJitterBackoff(cap=backoff_max, base=0.25)
        self._locks_fail_closed = locks_fail_closed
        self._redis: RedisStore | None = None
        self._link: RedisLink | None = None
        #: The near cache (5.2), None when WKSD_NEAR_CACHE_BYTES is 0.
        self.near = NearCache(near_cache_bytes, metrics) if near_cache_bytes > 0 else None
        self._journal = open_journal(memory)  # with the outage a restart interrupted
        self._reconciler = Reconciler(memory, self._journal, metrics, mirror=self._mirror)
        #: up (connected), down (cannot reach it), error (reached, but refused us).
        self.redis_status = "down"
        self._listeners: list[Callable[[str], None]] = []
        self._backend_changed = trio.Event()
        self._first_attempt = trio.Event()
        self._task = "reconnect"  # what the supervisor is doing, for its error counter
        metrics.set_backend("memory")
        if self._journal:
            log.info("outage writes from before the restart", pending_writes=len(self._journal))

    # -- state ------------------------------------------------------------------
    @property
    def keys(self) -> KeySpace:
        return self._keys

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
        if redis is None and self.near is not None:
            self.near.clear()  # no longer told of writes; the next link starts afresh
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
        while redis is None and (final_phase := self._reconciler.final_phase) is not None:
            await final_phase.wait()
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

    async def workflow_snapshot(self, finished_since: int | None) -> WorkflowSnapshot:
        return await self._read(lambda store: store.workflow_snapshot(finished_since))

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

    async def cache_lookup(self, key: str) -> tuple[bytes | None, bytes | None]:
        return await self._read(lambda store: store.cache_lookup(key))

    async def cache_fill(self, key: str, value: bytes, ttl_ms: int, meta: bytes | None) -> None:
        """Both keys are plain keys to the journal. Written back one by one after
        an outage, they get expiries of their own in Redis, so the metadata no
        longer counts there: the value stays fresh until it expires."""
        value_key, meta_key = self._keys.cache(key), self._keys.cache_meta(key)
        tried_redis = False

        async def routed(store: Store) -> None:
            nonlocal tried_redis
            if store is not self._memory:
                tried_redis = True
                return await store.cache_fill(key, value, ttl_ms, meta)
            # No checkpoint from here to the notes: nothing else runs between.
            seen = [await self._memory.get(value_key), await self._memory.get(meta_key)]
            await store.cache_fill(key, value, ttl_ms, meta)
            for name, base, ours in ((value_key, seen[0], value), (meta_key, seen[1], meta)):
                self._journal.note("key", name, base)
                if tried_redis:
                    self._journal.also_seen("key", name, ours)
            return None

        _, by_redis = await self._write(routed)
        if by_redis:
            self._mirror(
                lambda: self._memory.mirror_cache_fill(key, value, ttl_ms, meta),
                value_key,
                meta_key,
            )

    async def _write_plain(
        self,
        key: str,
        step: Callable[[Store], Awaitable[T]],
        changed: Callable[[T], bool],
        in_flight: BaseOrUnset = NO_BASE,
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

    async def lock_acquire(self, execution_id: str, owner: str, ttl_ms: int) -> LockOutcome:
        def acquire(store: Store) -> Awaitable[LockOutcome]:
            if store is self._memory and self._locks_fail_closed:
                raise Unavailable("Redis is down and WKSD_LOCKS_FAIL_CLOSED is set")
            return store.lock_acquire(execution_id, owner, ttl_ms)

        outcome, by_redis = await self._write(acquire)
        if by_redis:
            # Mirror the holder either way: during an outage this host still
            # knows the lock is taken, and by whom.
            assert outcome.holder is not None
            holder = outcome.holder
            self._mirror(
                lambda: self._memory.mirror_lock(
                    execution_id, holder, outcome.token, outcome.ttl_ms
                ),
                self._keys.lock(execution_id),
                self._keys.lock_token(execution_id),
            )
        elif outcome.acquired:
            self._note_lock(execution_id, owner)
            self._journal.note("fencing", self._keys.fencing)
        return outcome

    async def lock_release(self, execution_id: str, owner: str, token: int | None = None) -> str:
        status, by_redis = await self._write(
            lambda store: store.lock_release(execution_id, owner, token)
        )
        if status != "not_owner":
            lock_key = self._keys.lock(execution_id)
            token_key = self._keys.lock_token(execution_id)
            if by_redis:
                self._mirror(lambda: self._memory.mirror_delete(lock_key, token_key), lock_key)
            else:
                # Released here, or unknown here but perhaps held in Redis by
                # this owner: either way the release goes back.
                self._note_lock(execution_id, owner)
        return status

    async def lock_extend(self, execution_id: str, owner: str, ttl_ms: int) -> str:
        def extend(store: Store) -> Awaitable[str]:
            if store is self._memory and self._locks_fail_closed:
                # Never past the expiry Redis last confirmed: the memory copy
                # keeps that deadline, and the holder is told when it passes.
                raise Unavailable("Redis is down and WKSD_LOCKS_FAIL_CLOSED is set")
            return store.lock_extend(execution_id, owner, ttl_ms)

        status, by_redis = await self._write(extend)
        if status == "extended":
            if by_redis:
                lock_key = self._keys.lock(execution_id)
                token_key = self._keys.lock_token(execution_id)
                # The token goes on with the lock if memory knows it for this holding.
                self._mirror(
                    lambda: self._memory.mirror_lock(execution_id, owner, None, ttl_ms),
                    lock_key,
                    token_key,
                )
            else:
                self._note_lock(execution_id, owner)
        return status

    async def swap_workflow(self, swap: WorkflowSwap) -> bool:
        done, by_redis = await self._write(lambda store: store.swap_workflow(swap))
        if done:
            if by_redis:
                self._mirror(
                    lambda: self._memory.mirror_workflow(swap),
                    self._keys.workflow(swap.execution_id),
                )
            else:
                # What the write-back compares, as the writer told it: the
                # state itself is never read here.
                self._journal.note_stamp(swap.execution_id, swap.stamp)
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

    async def read_events(self, execution_id: str | None, since_ms: int, limit: int) -> list[bytes]:
        return await self._read(lambda store: store.read_events(execution_id, since_ms, limit))

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
                        link = await self._open_link(nursery)
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

    async def _open_link(self, nursery: trio.Nursery) -> RedisLink:
        if self.near is None:
            return await open_link(self._target, self._timeout, nursery, self._metrics)
        return await open_link(
            self._target,
            self._timeout,
            nursery,
            self._metrics,
            track=tracked_prefixes(self._keys),
            on_push=self.near.on_push,
        )

    async def _serve(self, link: RedisLink, nursery: trio.Nursery) -> bool:
        """Write back the outage, switch to Redis, and serve until the link breaks."""
        if self.near is not None:
            self.near.clear()  # nothing from before this link's tracking began
        redis = RedisStore(link, self._keys, near=self.near)
        await redis.load_scripts()
        self.redis_status = "up"
        self._metrics.redis_connection_status.set(1)
        log.info(
            "redis connected", target=self._target.describe(), pending_writes=len(self._journal)
        )
        self._task = "write_back"
        await self._reconciler.write_back(redis, lambda: self._switch(redis))
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
