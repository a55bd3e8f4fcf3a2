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

Writes made in memory during the outage are noted in a ``Journal``. The
supervisor task (``run``) reconnects with capped, jittered backoff, forever;
when Redis answers again it writes the journal back with the conflict rules
of DESIGN section 5 (``_restore``), many entries at once over the pipelined
link, while memory keeps serving. Clients that rewrite the same keys would
keep the journal from ever being empty, so once few entries are left a short
final phase begins: new writes wait (reads go on from memory, which is then
exactly current), the last entries go back, Redis takes over, and the waiting
writes go to Redis. The wait is the time to write back those few entries, and
never more than the Redis timeout, since a stalled link breaks and releases it.

Conflict rules: a workflow state goes back unless Redis holds one with an
``updatedAt`` as new or newer; a lock goes back unless Redis gave it to
someone else, whose it stays; the fencing counter is raised to the highest
token memory issued; sessions and cache entries carry no write time in the
seed's layout, so the outage write (or delete) wins. Every outcome is counted
(``wksd_reconciled_keys_total``) and conflicts are logged.
"""

from __future__ import annotations

import json
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
from .redis import RedisStore
from .redis_link import LinkDown, RedisLink
from .redis_target import RedisTarget, WrongRole, open_link

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


class Journal:
    """What memory changed while Redis was away: (kind, name) -> version.

    A version, not a flag: if the same key changes again while it is being
    written back, the newer change must not be forgotten when the older one
    is settled.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], int] = {}
        self._version = 0
        self.lock_owners: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, kind: str, name: str) -> None:
        self._version += 1
        self._entries[(kind, name)] = self._version

    def pending(self) -> list[tuple[str, str, int]]:
        return [(kind, name, version) for (kind, name), version in self._entries.items()]

    def settle(self, kind: str, name: str, version: int) -> bool:
        """Forget an entry written back, unless it changed again since."""
        if self._entries.get((kind, name)) != version:
            return False
        del self._entries[(kind, name)]
        return True


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
        self._journal = Journal()
        #: up (connected), down (cannot reach it), error (reached, but refused us).
        self.redis_status = "down"
        self._listeners: list[Callable[[str], None]] = []
        self._backend_changed = trio.Event()
        self._switching: trio.Event | None = None  # not None while writes wait (final phase)
        self._first_attempt = trio.Event()
        self._counts: dict[str, int] = {}
        metrics.set_backend("memory")

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
        _, by_redis = await self._write(lambda store: store.set(key, value, ttl_ms))
        if by_redis:
            self._memory.mirror_set(key, value, ttl_ms)
        else:
            self._journal.note("key", key)

    async def delete(self, key: str) -> bool:
        existed, by_redis = await self._write(lambda store: store.delete(key))
        if by_redis:
            self._memory.mirror_delete(key)
        else:
            self._journal.note("key", key)  # a delete goes back too, known here or not
        return existed

    async def expire(self, key: str, ttl_ms: int) -> bool:
        existed, by_redis = await self._write(lambda store: store.expire(key, ttl_ms))
        if by_redis:
            self._memory.mirror_expire(key, ttl_ms)
        elif existed:
            self._journal.note("key", key)
        return existed

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
            self._memory.mirror_lock(
                keys, execution_id, outcome.holder, outcome.token, outcome.ttl_ms
            )
        elif outcome.acquired:
            self._note_lock(execution_id, owner)
            self._journal.note("fencing", keys.fencing)
        return outcome

    async def lock_release(self, keys: KeySpace, execution_id: str, owner: str) -> str:
        status, by_redis = await self._write(
            lambda store: store.lock_release(keys, execution_id, owner)
        )
        if status != "not_owner":
            if by_redis:
                self._memory.mirror_delete(keys.lock(execution_id), keys.lock_token(execution_id))
            else:
                # Released here, or unknown here but perhaps held in Redis by
                # this owner: either way the release goes back.
                self._note_lock(execution_id, owner)
        return status

    async def lock_extend(self, keys: KeySpace, execution_id: str, owner: str, ttl_ms: int) -> str:
        status, by_redis = await self._write(
            lambda store: store.lock_extend(keys, execution_id, owner, ttl_ms)
        )
        if status == "extended":
            if by_redis:
                self._memory.mirror_lock(keys, execution_id, owner, None, ttl_ms)
            else:
                self._note_lock(execution_id, owner)
        return status

    async def swap_workflow(self, keys: KeySpace, swap: WorkflowSwap) -> bool:
        done, by_redis = await self._write(lambda store: store.swap_workflow(keys, swap))
        if done:
            if by_redis:
                self._memory.mirror_workflow(keys, swap)
            else:
                self._journal.note("workflow", swap.execution_id)
        return done

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
        self._journal.lock_owners[execution_id] = owner
        self._journal.note("lock", execution_id)

    # -- the supervisor ------------------------------------------------------------
    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, write back, serve, and reconnect after every failure, forever."""
        task_status.started()
        failures = 0
        while True:
            served = False
            async with trio.open_nursery() as nursery:
                try:
                    link = await open_link(self._target, self._timeout, nursery, self._metrics)
                    self._link = link
                    served = await self._serve(link, nursery)
                except (RedisError, OSError) as exc:
                    self._failed(exc, failures)
                    self._first_attempt.set()
                nursery.cancel_scope.cancel()
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
        await self._reconcile_and_switch(redis)
        self._first_attempt.set()
        self._metrics.redis_reconnects.inc()
        log.info("redis serving")
        nursery.start_soon(self._ping_forever, link)
        reason = await link.wait_broken()
        self._lost(redis, reason)
        return True

    def _failed(self, exc: BaseException, failures: int) -> None:
        refused = isinstance(exc, (AuthenticationError, WrongRole, ResponseError))
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
        """Write back ``pending`` entries, several at once; the first error is raised."""
        limiter = trio.CapacityLimiter(RESTORE_CONCURRENCY)
        failures: list[BaseException] = []

        async def restore(kind: str, name: str, version: int) -> None:
            async with limiter:
                try:
                    outcome, keys = await self._restore(redis, kind, name)
                except (RedisError, OSError) as exc:
                    failures.append(exc)
                    nursery.cancel_scope.cancel()
                    return
            self._metrics.reconciled_keys.labels(outcome).inc()
            if outcome == "conflict":
                self._counts["conflict"] += 1
                log.warning("reconcile conflict; Redis's value kept", kind=kind)
            else:
                self._counts["written"] += 1
            if self._journal.settle(kind, name, version):
                self._memory.mark_clean(*keys)

        async with trio.open_nursery() as nursery:
            for entry in pending:
                nursery.start_soon(restore, *entry)
        if failures:
            raise failures[0]

    async def _restore(self, redis: RedisStore, kind: str, name: str) -> tuple[str, list[str]]:
        """Write one journal entry back: its outcome, and the memory keys now clean."""
        memory, keys = self._memory, self._keys
        if kind == "key":
            value, ttl = await memory.get_with_ttl(name)
            return await redis.restore_plain(name, value, ttl), [name]
        if kind == "fencing":
            token = int(await memory.get(name) or b"0")
            await redis.raise_counter(name, token)
            return "written", []
        if kind == "lock":
            lock_key, token_key = keys.lock(name), keys.lock_token(name)
            holder, ttl = await memory.get_with_ttl(lock_key)
            if holder is None:
                owner = self._journal.lock_owners.get(name, "")
                status = await redis.lock_release(keys, name, owner)
                return ("deleted" if status == "released" else "kept"), []
            token = int(await memory.get(token_key) or b"0")
            outcome = await redis.restore_lock(
                keys, name, holder.decode(), ttl if ttl is not None else 1, token
            )
            return outcome, [lock_key, token_key]
        # kind == "workflow"
        state_key = keys.workflow(name)
        raw, ttl = await memory.get_with_ttl(state_key)
        if raw is None:
            return await redis.retire_workflow(keys, name), []
        state = json.loads(raw)
        finished_at = (
            state.get("completedAt")
            if state.get("status") in ("completed", "failed", "cancelled")
            else None
        )
        written = await redis.restore_workflow(
            keys,
            name,
            raw,
            ttl,
            int(state.get("updatedAt", 0)),
            active=name in await memory.members(keys.active),
            finished_at=finished_at,
        )
        return ("written" if written == "written" else "conflict"), [state_key]
