"""The Redis store: the Store interface over one ``RedisLink``.

Plain steps are single commands; the composite ones are the scripts of
``scripts.py``, run with EVALSHA and loaded again when Redis says NOSCRIPT.
The data layout is the seed's (the ``KeySpace`` the store is built for), so
the TypeScript app reads and writes the same keys. Besides the interface, it
offers the conditional writes that reconciliation after an outage needs
(``restore_*``).

Given a ``NearCache`` (``near``), reads of the keys it tracks are answered
from it when it has them, and every write this store sends for such a key
updates or drops its copy in the command's ``observe`` hook, on the link's
reader in wire order (``wksd.store.near_cache`` says why). A command error
drops the copy. Locks and what scripts read never come from it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.exceptions import NoScriptError

from ..keys import KeySpace
from .base import (
    EVENTS_IN_ALL,
    EVENTS_PER_EXECUTION,
    LockOutcome,
    WorkflowSnapshot,
    WorkflowStamp,
    WorkflowSwap,
)
from .near_cache import NearCache, tracked_prefixes
from .redis_link import Observer, RedisLink
from .scripts import (
    CACHE_FILL,
    CACHE_LOOKUP,
    DELETE_IF_EQUAL,
    LOCK_ACQUIRE,
    LOCK_EXTEND,
    LOCK_RELEASE,
    RAISE_COUNTER,
    RESTORE_LOCK,
    RESTORE_PLAIN,
    RESTORE_WORKFLOW,
    SCRIPTS,
    WORKFLOW_SNAPSHOT,
    WORKFLOW_SWAP,
    Script,
)

__all__ = ["RedisStore", "Restored"]

log = structlog.get_logger("wksd.redis")


@dataclass(frozen=True, slots=True)
class Restored:
    """The outcome of a conditional write-back: ``written``, ``deleted`` or
    ``conflict``; on a conflict, what Redis holds instead (``current``, None
    for nothing), the ms it has left, and for a workflow whether its id is in
    the active set."""

    outcome: str
    current: bytes | None = None
    ttl_ms: int | None = None
    active: bool = False


def _ttl(reply: int) -> int | None:
    """PTTL's answer as ms left; -1 (no TTL) and -2 (no key) are None."""
    return reply if reply >= 0 else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _wrote(
    near: NearCache,
    key: str,
    value: bytes | None,
    ttl_ms: int | None,
    known: Callable[[Any], bool] = lambda reply: True,
) -> Observer:
    """The ``observe`` of a write of ``key``, made just before it is sent: once
    applied (a reply ``known`` takes), the copy is ``value`` (None: deleted) with
    ``ttl_ms``; after an error, or another reply, the copy goes."""
    sent_at = near.now()

    def observe(replies: list[Any]) -> None:
        (reply,) = replies
        if isinstance(reply, Exception) or not known(reply):
            near.forget(key)
        else:
            near.wrote(key, value, ttl_ms, sent_at)

    return observe


def _read_with_ttl(key: str) -> list[list[str]]:
    """A near-cache miss: the value and its TTL, as of one moment."""
    return [["MULTI"], ["GET", key], ["PTTL", key], ["EXEC"]]


def _forgets(near: NearCache | None, key: str) -> Observer | None:
    """The ``observe`` of a write whose outcome the copy does not follow: it drops ``key``."""
    if near is None:
        return None
    return lambda replies: near.forget(key)


def _stamp_args(stamp: WorkflowStamp | None) -> list[Any]:
    """RESTORE_WORKFLOW's ARGV[5..7]; all '' when there is no stamp."""
    if stamp is None:
        return ["", "", ""]
    finished_at = "" if stamp.finished_at is None else stamp.finished_at
    return [stamp.updated_at, "1" if stamp.finished else "0", finished_at]


class RedisStore:
    """The Store interface over ``link``, for one key space (``keys``: the
    seed's ``wks:`` prefix unless told otherwise)."""

    def __init__(
        self, link: RedisLink, keys: KeySpace | None = None, *, near: NearCache | None = None
    ) -> None:
        self.link = link
        self.keys = KeySpace() if keys is None else keys
        #: The near cache, on a link opened with its tracking (open_link's ``track``).
        self.near = near
        self._tracked = tracked_prefixes(self.keys)

    def _near_for(self, key: str) -> NearCache | None:
        """The near cache, if there is one and ``key`` is under a prefix it holds."""
        near = self.near
        return near if near is not None and key.startswith(self._tracked) else None

    async def load_scripts(self) -> None:
        """SCRIPT LOAD every script, in one write."""
        replies = await self.link.pipeline([["SCRIPT", "LOAD", s.source] for s in SCRIPTS])
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply

    async def _run(
        self, script: Script, keys: list[str], args: list[Any], observe: Observer | None = None
    ) -> Any:
        command = ["EVALSHA", script.sha, len(keys), *keys, *args]
        try:
            return await self.link.execute(*command, name=script.name, observe=observe)
        except NoScriptError:
            await self.link.execute("SCRIPT", "LOAD", script.source)
            return await self.link.execute(*command, name=script.name, observe=observe)

    # -- the Store interface ---------------------------------------------
    async def get(self, key: str) -> bytes | None:
        near = self._near_for(key)
        if near is None:
            return await self.link.execute("GET", key)  # type: ignore[no-any-return]
        # What Redis has sent comes first. Redis writes out a write's
        # invalidations in the same pass of its event loop as the write's
        # reply, so a read asked for after the writer was answered finds
        # them here, even before the reader task has run (README, "Near cache").
        self.link.take_waiting()
        if self.link.broken:
            near.clear()  # its pushes stopped with the link
            return await self.link.execute("GET", key)  # type: ignore[no-any-return]  # LinkDown
        hit, value = near.lookup(key)
        if hit:
            return value
        sent_at = near.now()

        def observe(replies: list[Any]) -> None:
            answer = replies[-1]  # EXEC's: [value, pttl], or an error
            if isinstance(answer, list) and not any(isinstance(r, Exception) for r in answer):
                near.filled(key, answer[0], answer[1], sent_at)
            else:
                near.forget(key)

        # In one transaction, so no push can fall between the value and its TTL:
        # a push before EXEC's reply is news of an older write, one after of a newer.
        replies = await self.link.pipeline(_read_with_ttl(key), observe)
        answer = replies[-1]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer[0], Exception):
            raise answer[0]
        return answer[0]  # type: ignore[no-any-return]

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None:
        command = ["SET", key, value] if ttl_ms is None else ["SET", key, value, "PX", ttl_ms]
        near = self._near_for(key)
        observe = None if near is None else _wrote(near, key, value, ttl_ms)
        await self.link.execute(*command, observe=observe)

    async def delete(self, key: str) -> bool:
        near = self._near_for(key)
        observe = None if near is None else _wrote(near, key, None, None)
        return bool(await self.link.execute("DEL", key, observe=observe))

    async def expire(self, key: str, ttl_ms: int) -> bool:
        near = self._near_for(key)
        if near is None:
            return bool(await self.link.execute("PEXPIRE", key, ttl_ms))
        sent_at = near.now()

        def observe(replies: list[Any]) -> None:
            (reply,) = replies
            if isinstance(reply, Exception) or ttl_ms <= 0:
                near.forget(key)
            elif reply:
                near.expire(key, ttl_ms, sent_at)
            else:
                near.wrote(key, None, None, sent_at)  # no such key

        return bool(await self.link.execute("PEXPIRE", key, ttl_ms, observe=observe))

    async def get_with_ttl(self, key: str) -> tuple[bytes | None, int | None]:
        value, ttl = await self.link.pipeline([["GET", key], ["PTTL", key]])
        for reply in (value, ttl):
            if isinstance(reply, Exception):
                raise reply
        return value, None if value is None else _ttl(ttl)

    async def members(self, key: str) -> list[str]:
        return sorted(_text(m) for m in await self.link.execute("SMEMBERS", key))

    async def lock_acquire(self, execution_id: str, owner: str, ttl_ms: int) -> LockOutcome:
        keys = self.keys
        acquired, holder, token, ttl = await self._run(
            LOCK_ACQUIRE,
            [keys.lock(execution_id), keys.lock_token(execution_id), keys.fencing],
            [owner, ttl_ms],
        )
        return LockOutcome(bool(acquired), _text(holder), token if acquired else None, _ttl(ttl))

    async def lock_release(self, execution_id: str, owner: str, token: int | None = None) -> str:
        return _text(
            await self._run(
                LOCK_RELEASE,
                [self.keys.lock(execution_id), self.keys.lock_token(execution_id)],
                [owner, "" if token is None else token],
            )
        )

    async def lock_extend(self, execution_id: str, owner: str, ttl_ms: int) -> str:
        return _text(
            await self._run(
                LOCK_EXTEND,
                [self.keys.lock(execution_id), self.keys.lock_token(execution_id)],
                [owner, ttl_ms],
            )
        )

    async def swap_workflow(self, swap: WorkflowSwap) -> bool:
        expected, keys = swap.expected, self.keys
        state_key = keys.workflow(swap.execution_id)
        near = self._near_for(state_key)
        # Swapped (1): the state is ours. Lost (0): someone else's, not known here.
        observe = None if near is None else _wrote(near, state_key, swap.new, swap.ttl_ms, bool)
        if swap.new is None and near is not None:
            # A swap that only moves the indexes (retire, finished) leaves the state as it was.
            observe = _forgets(near, state_key)
        script_keys = [state_key, keys.active, keys.finished]
        args = [
            "0" if expected is None else "1",
            b"" if expected is None else expected,
            b"" if swap.new is None else swap.new,
            "" if swap.ttl_ms is None else swap.ttl_ms,
            swap.execution_id,
            "1" if swap.active else "0",
            "" if swap.finished_at is None else swap.finished_at,
            swap.retain_since,
        ]
        event = swap.event
        if event is not None:
            script_keys += [keys.events(swap.execution_id), keys.events(None)]
            args += [
                event.at_ms,
                event.raw,
                EVENTS_PER_EXECUTION,
                EVENTS_IN_ALL,
                event.retain_ms,
                event.channel,
                event.message,
            ]
        applied = await self._run(WORKFLOW_SWAP, script_keys, args, observe)
        if applied == 2:
            log.warning("workflow event not recorded", execution_id=swap.execution_id)
        return bool(applied)

    async def workflow_snapshot(self, finished_since: int | None) -> WorkflowSnapshot:
        ids, states, finished = await self._run(
            WORKFLOW_SNAPSHOT,
            [self.keys.active, self.keys.finished],
            [self.keys.workflow_prefix, "" if finished_since is None else finished_since],
        )
        active = sorted(zip((_text(i) for i in ids), states, strict=True))
        return WorkflowSnapshot(active, list(finished))

    # -- coordination ----------------------------------------------------------
    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        return await self.link.execute("MGET", *keys)  # type: ignore[no-any-return]

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        near = self._near_for(key)
        # Not set (None): the key is someone else's, its value not known here.
        observe = None if near is None else _wrote(near, key, value, ttl_ms, known=bool)
        command = ["SET", key, value, "NX", "PX", ttl_ms]
        return bool(await self.link.execute(*command, observe=observe))

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        near = self._near_for(key)
        observe = None if near is None else _wrote(near, key, None, None, known=bool)
        return bool(await self._run(DELETE_IF_EQUAL, [key], [value], observe))

    async def cache_fill(self, key: str, value: bytes, ttl_ms: int, meta: bytes | None) -> None:
        value_key = self.keys.cache(key)
        near = self._near_for(value_key)
        await self._run(
            CACHE_FILL,
            [value_key, self.keys.cache_meta(key)],
            [value, ttl_ms, b"" if meta is None else meta],
            None if near is None else _wrote(near, value_key, value, ttl_ms),
        )

    async def cache_lookup(self, key: str) -> tuple[bytes | None, bytes | None]:
        value, meta, bound = await self._run(
            CACHE_LOOKUP, [self.keys.cache(key), self.keys.cache_meta(key)], []
        )
        return value, meta if bound else None

    async def publish(self, channel: str, message: bytes) -> None:
        await self.link.execute("PUBLISH", channel, message)

    async def read_events(self, execution_id: str | None, since_ms: int, limit: int) -> list[bytes]:
        entries = await self.link.execute(
            "XRANGE", self.keys.events(execution_id), max(since_ms + 1, 0), "+", "COUNT", limit
        )
        return [dict(zip(fields[::2], fields[1::2], strict=True))[b"e"] for _, fields in entries]

    # -- reconciliation after an outage ---------------------------------------
    async def restore_plain(
        self,
        key: str,
        seen: bytes | None,
        value: bytes | None,
        ttl_ms: int | None,
        *,
        also_seen: Sequence[bytes | None] = (),
    ) -> Restored:
        """Write back (or delete, ``value`` None) a session, cache entry or other
        plain key, only if Redis still holds ``seen`` (None: absent), what this
        host last saw before the outage, or one of ``also_seen`` (writes that
        were in flight when the link broke); otherwise Redis's value stays."""
        reply = await self._run(
            RESTORE_PLAIN,
            [key],
            [
                "0" if seen is None else "1",
                b"" if seen is None else seen,
                "0" if value is None else "1",
                b"" if value is None else value,
                "" if ttl_ms is None else ttl_ms,
                *(b"-" if other is None else b"v" + other for other in also_seen),
            ],
            _forgets(self._near_for(key), key),
        )
        outcome = _text(reply[0])
        if outcome != "conflict":
            return Restored(outcome)
        current = reply[1]
        return Restored(outcome, current, None if current is None else _ttl(reply[2]))

    async def restore_workflow(
        self,
        execution_id: str,
        state: bytes,
        ttl_ms: int | None,
        stamp: WorkflowStamp | None,
        *,
        active: bool,
    ) -> Restored:
        """Write back a state unless Redis holds one as new or newer, or a
        finished one while ours is not, as ``stamp`` tells of ours (None: not
        told, in a journal written before stamps were; the script reads it)."""
        keys = self.keys
        reply = await self._run(
            RESTORE_WORKFLOW,
            [keys.workflow(execution_id), keys.active, keys.finished],
            [
                state,
                "" if ttl_ms is None else ttl_ms,
                execution_id,
                "1" if active else "0",
                *_stamp_args(stamp),
            ],
            _forgets(self._near_for(keys.workflow(execution_id)), keys.workflow(execution_id)),
        )
        outcome = _text(reply[0])
        if outcome != "conflict":
            return Restored(outcome)
        return Restored(outcome, reply[1], _ttl(reply[2]), bool(reply[3]))

    async def retire_workflow(self, execution_id: str) -> str:
        """The state is gone here: leave the active set, unless Redis still has it."""
        gone = WorkflowSwap(execution_id, None, None, None, active=False)
        return "deleted" if await self.swap_workflow(gone) else "kept"

    async def restore_lock(self, execution_id: str, holder: str, ttl_ms: int, token: int) -> str:
        """Give a lock taken during the outage back to Redis, unless someone has it there."""
        keys = self.keys
        return _text(
            await self._run(
                RESTORE_LOCK,
                [keys.lock(execution_id), keys.lock_token(execution_id), keys.fencing],
                [holder, ttl_ms, token],
            )
        )

    async def raise_counter(self, key: str, value: int) -> int:
        observe = _forgets(self._near_for(key), key)
        return int(await self._run(RAISE_COUNTER, [key], [value], observe))
