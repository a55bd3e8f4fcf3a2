"""The store interface the domain code is written against (STYLE habit 3).

Two implementations hold the data: ``MemoryStore`` and the Redis store; a
failover store in front picks one. The interface is the Redis subset wksd
needs (strings with TTL, sets) plus the composite steps that must be atomic
across every daemon sharing a Redis. Those are primitives here, a Lua script
in Redis and a plain function in memory, so the domain never does a
read-modify-write of its own:

- ``lock_acquire`` / ``lock_release`` / ``lock_extend``: owner-checked, with
  the fencing token;
- ``swap_workflow``: compare-and-set of a workflow state together with its
  membership in the active set and the finished index, and the event that
  tells of the change (its history and the message to the other daemons);
- ``workflow_snapshot``: every active state (and recently finished ones) in one
  round trip;
- ``cache_fill`` / ``cache_lookup``: a cached value with the metadata bound to
  it (they expire in the same millisecond).

Each store is built for one ``KeySpace`` (the seed's key layout under one
prefix) and names the keys of its composite steps itself: the domain passes
execution ids and cache keys, never key names, to those steps.

Values are bytes (the domain stores JSON), TTLs integer milliseconds. The
stores never read a workflow state: what the write-back after an outage
needs of one (whether it is finished, its ``updatedAt``) comes with the
swap that writes it (``WorkflowSwap.stamp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Protocol

from clientlib.errors import InternalError

__all__ = [
    "LockOutcome",
    "LockStatus",
    "Store",
    "WorkflowEvent",
    "WorkflowSnapshot",
    "WorkflowStamp",
    "WorkflowSwap",
    "WrongType",
    "recorded_token",
    "token_record",
]

#: How many events an execution's history keeps, and the all-executions one.
#: Enough to replay a long workflow's progress; bounded so a chatty one cannot
#: grow without end (Redis trims approximately, a little above these).
EVENTS_PER_EXECUTION = 1000
EVENTS_IN_ALL = 10_000


class LockStatus(StrEnum):
    """Outcomes of lock_release and lock_extend, as the wire names them."""

    RELEASED = "released"
    EXTENDED = "extended"
    NOT_FOUND = "not_found"
    NOT_OWNER = "not_owner"


# The members under the short names the stores' code uses.
RELEASED: Final = LockStatus.RELEASED
EXTENDED: Final = LockStatus.EXTENDED
NOT_FOUND: Final = LockStatus.NOT_FOUND
NOT_OWNER: Final = LockStatus.NOT_OWNER


class WrongType(InternalError):
    """A key holds a different kind of value than the operation expects."""


def token_record(token: int, holder: bytes) -> bytes:
    """The token key's value: the token and the holder it was given to.

    The record is the holding's while it also expires with its lock, at the
    same millisecond (the scripts' ``_HELD_TOKEN``; DESIGN 3.2).
    """
    return b"%d:%s" % (token, holder)


def recorded_token(record: bytes | None, holder: bytes) -> int | None:
    """The token ``record`` gives ``holder``; None when it names someone else,
    or nobody (absent, or an old plain-integer value)."""
    if record is None:
        return None
    token, sep, named = record.partition(b":")
    if not sep or named != holder or not token.isdigit():
        return None
    return int(token)


@dataclass(frozen=True, slots=True)
class LockOutcome:
    """The result of ``lock_acquire``.

    ``holder`` is whoever holds the lock afterwards; ``token`` the fencing
    token when acquired; ``ttl_ms`` the time left on the holder's lock.
    """

    acquired: bool
    holder: str | None
    token: int | None
    ttl_ms: int | None


@dataclass(frozen=True, slots=True)
class WorkflowStamp:
    """What the write-back after an outage compares a workflow state by
    (DESIGN section 5), told by whoever wrote the state, so no store reads it.

    ``updated_at`` is the state's ``updatedAt`` (ms; 0 when it has none),
    ``finished`` whether its status is a final one, and ``finished_at`` its
    score in the finished index (None: not indexed).
    """

    updated_at: int
    finished: bool
    finished_at: int | None


@dataclass(frozen=True, slots=True)
class WorkflowEvent:
    """The news of a workflow change, sent with the swap that makes it.

    ``raw`` (JSON) is appended at ``at_ms`` to the execution's history, which
    then lives ``retain_ms``, and to the all-executions one; ``message`` is
    published on ``channel`` for the other daemons sharing the Redis. Only a
    swap that is applied records and publishes its event, and failing to do
    either never fails the swap: the change is what the worker asked for,
    the event is news about it.
    """

    raw: bytes
    at_ms: int
    retain_ms: int
    channel: str
    message: bytes


@dataclass(frozen=True, slots=True)
class WorkflowSwap:
    """One atomic change of a workflow's state and its index entries.

    Applied only if the state key still holds ``expected`` (None: absent).
    Then the state becomes ``new`` for ``ttl_ms`` (None: left as it is), and
    the id joins the active set (``active``) or leaves it; a finished one is
    recorded in the finished index at ``finished_at`` (ms), and index entries
    older than ``retain_since`` (ms) are pruned.

    ``updated_at`` and ``finished`` describe the state the key holds after
    the swap (``new``, or ``expected`` when ``new`` is None): its
    ``updatedAt`` (ms, 0: none) and whether it is finished. The stores apply
    a swap without them; the failover journals them (``stamp``) for the
    write-back of a swap made in memory during an outage.

    ``event``, if any, is recorded and published with the swap, in the same
    step (one round trip to Redis).
    """

    execution_id: str
    expected: bytes | None
    new: bytes | None
    ttl_ms: int | None
    active: bool
    finished_at: int | None = None
    retain_since: int = 0
    updated_at: int = 0
    finished: bool = False
    event: WorkflowEvent | None = None

    @property
    def stamp(self) -> WorkflowStamp:
        return WorkflowStamp(self.updated_at, self.finished, self.finished_at)


@dataclass(frozen=True, slots=True)
class WorkflowSnapshot:
    """States read in one go: each active id with its state (None if gone),
    and the states of executions finished since the requested time."""

    active: list[tuple[str, bytes | None]]
    finished: list[bytes]


class Store(Protocol):
    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_ms: int | None) -> None: ...

    async def delete(self, key: str) -> bool:
        """Remove a key; True when it existed."""
        ...

    async def expire(self, key: str, ttl_ms: int) -> bool:
        """Reset a key's TTL; True when it existed."""
        ...

    async def get_with_ttl(self, key: str) -> tuple[bytes | None, int | None]:
        """The value and the ms it has left (None: no TTL, or no key)."""
        ...

    async def members(self, key: str) -> list[str]:
        """The members of a set, sorted."""
        ...

    async def lock_acquire(self, execution_id: str, owner: str, ttl_ms: int) -> LockOutcome: ...

    async def lock_release(self, execution_id: str, owner: str, token: int | None = None) -> str:
        """``released``, ``not_found`` or ``not_owner``; with ``token``, only the
        holding that token was given to counts as ``owner``'s."""
        ...

    async def lock_extend(self, execution_id: str, owner: str, ttl_ms: int) -> str:
        """``extended``, ``not_found`` or ``not_owner``."""
        ...

    async def swap_workflow(self, swap: WorkflowSwap) -> bool:
        """Apply ``swap`` if the state is still as expected; False if not."""
        ...

    async def workflow_snapshot(self, finished_since: int | None) -> WorkflowSnapshot:
        """Active states, plus finished ones since ``finished_since`` (ms) if given."""
        ...

    # -- coordination (wksd's own keys; see docs/protocol-extensions.md) ----
    async def get_many(self, keys: list[str]) -> list[bytes | None]: ...

    async def set_if_absent(self, key: str, value: bytes, ttl_ms: int) -> bool:
        """SET NX PX: True when this call created the key."""
        ...

    async def delete_if_equal(self, key: str, value: bytes) -> bool:
        """Delete ``key`` only if it still holds ``value`` (an owner-checked release)."""
        ...

    async def cache_fill(self, key: str, value: bytes, ttl_ms: int, meta: bytes | None) -> None:
        """Cache ``value`` for ``ttl_ms`` and, at once, its stale-while-revalidate
        metadata, expiring in the same millisecond (None: delete any)."""
        ...

    async def cache_lookup(self, key: str) -> tuple[bytes | None, bytes | None]:
        """A cached value and its metadata, the latter only while it is that
        value's: expiring with it (a write of the value by any other path
        gives the value another expiry)."""
        ...

    async def publish(self, channel: str, message: bytes) -> None:
        """Tell the other daemons sharing Redis; nothing to do without Redis."""
        ...

    async def read_events(self, execution_id: str | None, since_ms: int, limit: int) -> list[bytes]:
        """Recorded events with a time after ``since_ms``, oldest first, at most ``limit``."""
        ...
