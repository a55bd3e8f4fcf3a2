"""The outage journal, and writing it back to Redis without undoing anyone.

Theory of operation
-------------------
While Redis is away the failover store serves from memory and notes each
write in a ``Journal``: which key changed (a version, not a flag, so a key
that changes again while it is written back is not forgotten), and what the
conflict rules below will need of it, all known when the write is made:

- a plain key (a session, a cache entry) keeps its *base*, what this host
  last saw of it before the outage (the memory copy just before the first
  outage write, or "absent"), and the values Redis may hold instead because a
  write of them was in flight when the link broke (``also_seen``);
- a lock keeps the worker whose lock changed (``note_owner``);
- a workflow keeps its *stamp* (``WorkflowStamp``: the state's
  ``updatedAt``, whether it is finished, its finished-index score), which the
  domain hands over with the swap; nothing here reads workflow JSON.

The journal goes into the memory store's durable log with the write itself
(``MemoryStore.record``), as ops whose names start with "j", so an outage not
yet written back survives a restart: ``open_journal`` rebuilds it from the
ops the log replayed and registers ``Journal.snapshot`` for compaction. A
journal written before stamps were kept replays too; its workflow entries
have none, and the write-back script then reads our state as it reads
Redis's.

When Redis answers again, ``Reconciler.write_back`` writes the journal back,
many entries at once over the pipelined link, while memory keeps serving.
Clients that rewrite the same keys would keep the journal from ever being
empty, so once few entries are left (or after a few passes) a short *final
phase* begins: new writes wait (``final_phase``; reads go on from memory,
which is then exactly current), the last entries go back, Redis takes over
(the caller's ``switch``), and the waiting writes go to Redis. The wait is
the time to write back those few entries, and never more than the Redis
timeout, since a stalled link breaks and releases it. An entry that fails
stays in the journal, to go back on the next connection.

Conflict rules (DESIGN section 5; write-back never undoes what another host
wrote meanwhile): a workflow state goes back unless Redis holds one with an
``updatedAt`` as new or newer, or a finished one while ours is still running
(the seed's app completes a run without touching ``updatedAt``); a session,
cache entry or delete goes back only if Redis still holds the base or one of
the values in flight (a compare-and-set in Lua); a lock goes back unless
Redis gave it to someone else, whose it stays; the fencing counter is raised
to the highest token memory issued. When Redis's value stays, memory takes a
copy of it. Every outcome is counted (``wksd_reconciled_keys_total``) and
conflicts are logged.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog
import trio

from ..metrics import Metrics
from .base import WorkflowStamp, WorkflowSwap
from .memory import MemoryStore
from .redis import RedisStore

__all__ = [
    "FINAL_PHASE_ENTRIES",
    "MAX_OPEN_PASSES",
    "NO_BASE",
    "RESTORE_CONCURRENCY",
    "Base",
    "BaseOrUnset",
    "Journal",
    "Reconciler",
    "open_journal",
]

log = structlog.get_logger("wksd.redis")

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
#: A base, or NO_BASE.
BaseOrUnset = Base | _Unset

#: What to do to memory once an entry is written back: called with True when
#: the entry is settled, False when it changed again meanwhile.
Finish = Callable[[bool], None]


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
    ``["jo", execution_id, owner]`` (a lock's owner), ``["jw", execution_id,
    updated_at, finished, finished_at]`` (a workflow's stamp). ``apply``
    rebuilds the journal from them, and ``snapshot`` gives the ops that
    rebuild it now.
    """

    def __init__(self, record: Callable[[list[Any]], None] = _no_record) -> None:
        self._entries: dict[tuple[str, str], int] = {}
        self._bases: dict[tuple[str, str], Base] = {}
        # Values Redis may hold instead of the base: writes that were in
        # flight to Redis when the link broke may still be applied there.
        self._alternates: dict[tuple[str, str], list[Base]] = {}
        self._owners: dict[str, str] = {}
        self._stamps: dict[str, WorkflowStamp] = {}
        self._version = 0
        self._record = record

    def __len__(self) -> int:
        return len(self._entries)

    def note(self, kind: str, name: str, base: BaseOrUnset = NO_BASE) -> None:
        """Journal a change; ``base`` counts only when the entry is new."""
        self._record(["jn", kind, name] if base is NO_BASE else ["jn", kind, name, base])
        self._note(kind, name, base)

    def note_owner(self, execution_id: str, owner: str) -> None:
        """The worker whose lock on ``execution_id`` changed, for its write-back."""
        self._record(["jo", execution_id, owner])
        self._owners[execution_id] = owner

    def owner(self, execution_id: str) -> str:
        return self._owners.get(execution_id, "")

    def note_stamp(self, execution_id: str, stamp: WorkflowStamp) -> None:
        """What the workflow's state, as just written, is compared by at write-back."""
        self._record(["jw", execution_id, stamp.updated_at, stamp.finished, stamp.finished_at])
        self._stamps[execution_id] = stamp

    def stamp(self, execution_id: str) -> WorkflowStamp | None:
        """The workflow's stamp; None for an entry of a journal from before stamps."""
        return self._stamps.get(execution_id)

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
            case ["jw", str(execution_id), int(updated_at), bool(finished), finished_at] if (
                finished_at is None or type(finished_at) is int
            ):
                self._stamps[execution_id] = WorkflowStamp(updated_at, finished, finished_at)
            case _:
                raise ValueError(f"not a journal op: {op[:1]!r}")

    def snapshot(self) -> list[list[Any]]:
        """Ops that rebuild the journal as it is now, entries in their order."""
        ops: list[list[Any]] = [["jo", eid, owner] for eid, owner in self._owners.items()]
        ops.extend(
            ["jw", eid, stamp.updated_at, stamp.finished, stamp.finished_at]
            for eid, stamp in self._stamps.items()
        )
        for kind, name in self._entries:
            if (kind, name) in self._bases:
                ops.append(["jn", kind, name, self._bases[(kind, name)]])
            else:
                ops.append(["jn", kind, name])
            ops.extend(["ja", kind, name, value] for value in self.alternates(kind, name))
        return ops

    def _note(self, kind: str, name: str, base: BaseOrUnset) -> None:
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
        elif kind == "workflow":
            self._stamps.pop(name, None)


def open_journal(memory: MemoryStore) -> Journal:
    """The journal kept in ``memory``'s durable log: rebuilt from the ops a
    restart replayed (an outage it interrupted), and registered so each
    compaction writes it into the snapshot."""
    journal = Journal(memory.record)
    for op in memory.take_foreign_ops():
        if op and isinstance(op[0], str) and op[0].startswith("j"):
            journal.apply(op)
        else:
            log.warning("ignoring an unknown op in the durable log", op=str(op[:1])[:32])
    memory.register_snapshot_source(journal.snapshot)
    return journal


class Mirror(Protocol):
    """Copy into memory what Redis holds (``copy``); if that fails, drop the
    memory copy of ``keys`` instead (the failover store's ``_mirror``)."""

    def __call__(self, copy: Callable[[], None], *keys: str) -> None: ...


def _nothing(settled: bool) -> None:
    return None


class Reconciler:
    """Writes a ``Journal`` back to Redis with the conflict rules (module docstring)."""

    def __init__(
        self, memory: MemoryStore, journal: Journal, metrics: Metrics, *, mirror: Mirror
    ) -> None:
        self._memory = memory
        self._journal = journal
        self._metrics = metrics
        self._mirror = mirror
        self._final_phase: trio.Event | None = None
        self._counts: dict[str, int] = {}

    @property
    def final_phase(self) -> trio.Event | None:
        """While the final phase runs, an event set when it ends; else None.
        Writes that memory would serve wait for it."""
        return self._final_phase

    async def write_back(self, redis: RedisStore, switch: Callable[[], None]) -> None:
        """Write the journal back, then, in the final phase, the last entries
        and ``switch()`` (Redis serves from then on). Raises the first error;
        what was not written back stays in the journal."""
        self._counts = {"written": 0, "conflict": 0}
        for _ in range(MAX_OPEN_PASSES):
            if len(self._journal) <= FINAL_PHASE_ENTRIES:
                break
            await self._restore_all(redis, self._journal.pending())
        self._final_phase = trio.Event()
        try:
            while pending := self._journal.pending():  # only entries from before the pause
                await self._restore_all(redis, pending)
            switch()
        finally:
            self._final_phase.set()
            self._final_phase = None
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
            self._count(outcome, kind)
            finish(self._journal.settle(kind, name, version))

        async with trio.open_nursery() as nursery:
            for entry in pending:
                nursery.start_soon(restore, *entry)
        if failures:
            raise failures[0]

    def _count(self, outcome: str, kind: str) -> None:
        self._metrics.reconciled_keys.labels(outcome).inc()
        if outcome == "conflict":
            self._counts["conflict"] += 1
            log.warning("reconcile conflict; Redis's value kept", kind=kind)
        else:
            self._counts["written"] += 1

    async def _restore(self, redis: RedisStore, kind: str, name: str) -> tuple[str, Finish]:
        """Write one journal entry back: its outcome, and what to do to memory
        once the entry is settled (called with True) or found changed again."""
        if kind == "key":
            return await self._restore_key(redis, name)
        if kind == "fencing":
            token = int(await self._memory.get(name) or b"0")
            await redis.raise_counter(name, token)
            return "written", _nothing
        if kind == "lock":
            return await self._restore_lock(redis, name)
        return await self._restore_workflow(redis, name)  # kind == "workflow"

    async def _restore_key(self, redis: RedisStore, name: str) -> tuple[str, Finish]:
        memory, journal = self._memory, self._journal
        value, ttl = await memory.get_with_ttl(name)
        restored = await redis.restore_plain(
            name,
            journal.base("key", name),
            value,
            ttl,
            also_seen=journal.alternates("key", name),
        )

        def finish(settled: bool) -> None:
            if restored.outcome == "conflict":
                if settled:  # memory copies what Redis kept
                    self._copy(name, restored.current, restored.ttl_ms)
            elif settled:
                memory.mark_clean(name)
            else:  # changed again meanwhile: the next try compares with ours
                journal.rebase("key", name, value)

        return restored.outcome, finish

    async def _restore_lock(self, redis: RedisStore, name: str) -> tuple[str, Finish]:
        memory = self._memory
        lock_key, token_key = memory.keys.lock(name), memory.keys.lock_token(name)
        holder, ttl = await memory.get_with_ttl(lock_key)
        if holder is None:
            status = await redis.lock_release(name, self._journal.owner(name))
            return ("deleted" if status == "released" else "kept"), _nothing
        # 0: memory knows no token of this holding; Redis's next acquire gives one.
        token = memory.held_token(name) or 0
        outcome = await redis.restore_lock(
            name, holder.decode(), ttl if ttl is not None else 1, token
        )
        return outcome, lambda settled: memory.mark_clean(lock_key, token_key) if settled else None

    async def _restore_workflow(self, redis: RedisStore, name: str) -> tuple[str, Finish]:
        memory = self._memory
        state_key = memory.keys.workflow(name)
        raw, ttl = await memory.get_with_ttl(state_key)
        if raw is None:
            return await redis.retire_workflow(name), _nothing
        restored = await redis.restore_workflow(
            name,
            raw,
            ttl,
            self._journal.stamp(name),
            active=name in await memory.members(memory.keys.active),
        )

        def finish(settled: bool) -> None:
            if not settled:
                return
            if restored.outcome != "conflict":
                memory.mark_clean(state_key)
                return
            copy = WorkflowSwap(
                name, None, restored.current, restored.ttl_ms, active=restored.active
            )
            self._mirror(lambda: memory.mirror_workflow(copy), state_key)

        return restored.outcome, finish

    def _copy(self, key: str, value: bytes | None, ttl_ms: int | None) -> None:
        """Make memory's copy of ``key`` what Redis holds."""
        if value is None:
            self._mirror(lambda: self._memory.mirror_delete(key), key)
        else:
            self._mirror(lambda: self._memory.mirror_set(key, value, ttl_ms), key)
