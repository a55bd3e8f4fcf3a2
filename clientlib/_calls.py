"""Every client method, written once, as a description of the call.

Each function here takes the method's Python arguments and returns a
``Call``: the wire method, its params, how to turn the raw result into the
typed value the caller gets, and what the answer does to the keepalive locks
the connection watches. ``clientlib._api`` declares each as a method of both
clients; the sync client runs a ``Call`` over a blocking socket and the async
client awaits it; neither repeats a method's arguments, defaults or
conversions. (The methods of more than one call are in ``clientlib._flows``.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from ._held import KeepAlive, OnLost, Release
from ._jsjson import stringify
from ._types import (
    CleanupResult,
    Health,
    LockResult,
    LockStatus,
    WorkflowEvent,
    WorkflowState,
    WorkflowStats,
)

__all__ = ["Call", "cache_key", "canonical_cache_key"]

T = TypeVar("T")

SESSION_TTL = 86400  # seconds: the seed's session lifetime
CACHE_TTL = 3600  # seconds: the seed's API-cache lifetime
LOCK_TTL = 300  # seconds: the seed's execution-lock lifetime
#: Seconds a caller computing a missing value holds its lease, and how long
#: the others wait for it, by default (as the daemon's defaults).
LEASE_TTL = 30


def _same(value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    method: str
    params: list[Any]
    convert: Callable[[Any], T] = _same
    #: Seconds the daemon may legitimately take on top of the client's
    #: timeout: a blocking acquire or a cache lease waits that long first.
    extra_timeout: float = 0.0
    #: What the answer does to the keepalive locks its connection watches.
    locks: KeepAlive | Release | None = None


def cache_key(params: Any) -> str:
    """The seed's key for ``params``: md5 hex of ``JSON.stringify(params)``, byte for byte.

    Keys keep JavaScript's order (integer-like first, then as inserted), so
    ``{"q": "shoes", "page": "2"}`` and ``{"page": "2", "q": "shoes"}`` are two
    keys, as they are in the seed; see ``clientlib._jsjson`` for the rules.
    """
    return hashlib.md5(stringify(params).encode(), usedforsecurity=False).hexdigest()


def canonical_cache_key(params: Any) -> str:
    """An order-insensitive key: md5 hex of ``params`` as JSON with sorted keys.

    Not the seed's key (the TypeScript app never finds it); for caches only
    Python workers share. It is the key ``cache_key`` gave before it matched
    the seed, so entries written then are still found.
    """
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.md5(canonical.encode(), usedforsecurity=False).hexdigest()


def _optional_state(state: Any) -> WorkflowState | None:
    """A state, or None: absent, or stored by another program as something
    other than a map (``call("workflow.get", ...)`` gives it as it is)."""
    return WorkflowState.from_wire(state) if isinstance(state, dict) else None


def call(method: str, /, *params: Any) -> Call[Any]:
    """Call any method with positional params; the raw result."""
    return Call(method, list(params))


def ping() -> Call[str]:
    return Call("ping", [])


def health() -> Call[Health]:
    return Call("health", [], Health.from_wire)


def metrics() -> Call[str]:
    """The Prometheus text exposition."""
    return Call("metrics", [])


def set_session(user_id: str, data: dict[str, Any], ttl: float = SESSION_TTL) -> Call[bool]:
    return Call("session.set", [user_id, data, ttl], bool)


def get_session(user_id: str) -> Call[dict[str, Any] | None]:
    return Call("session.get", [user_id])


def delete_session(user_id: str) -> Call[bool]:
    """True when the session existed."""
    return Call("session.delete", [user_id], bool)


def touch_session(user_id: str, ttl: float = SESSION_TTL) -> Call[bool]:
    """Reset a session's TTL; True when it existed."""
    return Call("session.touch", [user_id, ttl], bool)


def cache_api_response(key: str, response: Any, ttl: float = CACHE_TTL) -> Call[bool]:
    return Call("cache.set", [key, response, ttl], bool)


def get_cached_api_response(key: str) -> Call[Any]:
    return Call("cache.get", [key])


def delete_cached_api_response(key: str) -> Call[bool]:
    return Call("cache.delete", [key], bool)


def start_workflow_tracking(
    execution_id: str, workflow_id: str, total_steps: int, data: dict[str, Any] | None = None
) -> Call[WorkflowState]:
    return Call(
        "workflow.start", [execution_id, workflow_id, total_steps, data], WorkflowState.from_wire
    )


def update_workflow_progress(
    execution_id: str, completed_steps: int, current_step: str, data: dict[str, Any] | None = None
) -> Call[WorkflowState]:
    return Call(
        "workflow.update",
        [execution_id, completed_steps, current_step, data],
        WorkflowState.from_wire,
    )


def complete_workflow_tracking(
    execution_id: str,
    status: str = "completed",
    error: str | None = None,
    final_data: dict[str, Any] | None = None,
) -> Call[WorkflowState]:
    return Call(
        "workflow.complete", [execution_id, status, error, final_data], WorkflowState.from_wire
    )


def fetch_workflow_state(execution_id: str) -> Call[WorkflowState | None]:
    return Call("workflow.get", [execution_id], _optional_state)


def active_workflows() -> Call[list[str]]:
    return Call("workflow.active", [], lambda result: list(result["activeExecutions"]))


def active_workflows_detailed() -> Call[list[WorkflowState]]:
    return Call(
        "workflow.active_detailed",
        [],
        lambda result: [
            WorkflowState.from_wire(state)
            for state in result["workflows"]
            if isinstance(state, dict)
        ],
    )


def workflow_stats() -> Call[WorkflowStats]:
    return Call("workflow.stats", [], WorkflowStats.from_wire)


def cleanup_workflows() -> Call[CleanupResult]:
    """Mark stale runs failed and prune the active set (admin only)."""
    return Call("workflow.cleanup", [], CleanupResult.from_wire)


def acquire_lock(
    execution_id: str,
    worker_id: str,
    ttl: float = LOCK_TTL,
    keepalive: bool = False,
    wait: float = 0,
    *,
    on_lost: OnLost | None = None,
) -> Call[LockResult]:
    """Take the execution lock; the result carries the fencing token.

    ``keepalive``: the daemon extends the lock while this connection is open
    and releases it when the connection closes; the result's ``lost`` then
    turns true, and ``on_lost(lock)`` is called, once the client learns that
    the lock ended before this worker released it (the async client as soon
    as it reads so, the sync client when it next reads its socket: see each
    client's module doc). ``wait``: seconds to queue for the lock if another
    worker holds it (0: answer at once).
    """
    return Call(
        "lock.acquire",
        [execution_id, worker_id, ttl, keepalive, wait],
        LockResult.from_wire,
        extra_timeout=wait,
        locks=KeepAlive(execution_id, worker_id, on_lost) if keepalive else None,
    )


def lock_workflow_execution(
    execution_id: str,
    worker_id: str,
    ttl: float = LOCK_TTL,
    keepalive: bool = False,
    wait: float = 0,
) -> Call[bool]:
    """Take the execution lock (see ``acquire_lock``); True when this worker holds it."""
    taking = acquire_lock(execution_id, worker_id, ttl, keepalive, wait)
    return Call(
        taking.method, taking.params, lambda result: bool(result["acquired"]), taking.extra_timeout
    )


def unlock_workflow_execution(execution_id: str, worker_id: str) -> Call[bool]:
    """Release the lock if this worker holds it; True when it was released."""
    return _release(execution_id, worker_id, lambda result: bool(result["released"]))


def release_lock(execution_id: str, worker_id: str) -> Call[str]:
    """Release the lock if this worker holds it; the status (``released``,
    ``not_owner``, ``not_found``), for ``execute_with_lock``."""
    return _release(execution_id, worker_id, lambda result: str(result["status"]))


def _release(execution_id: str, worker_id: str, convert: Callable[[Any], T]) -> Call[T]:
    """A ``lock.release``; once answered, its connection stops watching the lock."""
    return Call(
        "lock.release", [execution_id, worker_id], convert, locks=Release(execution_id, worker_id)
    )


def extend_workflow_lock(execution_id: str, worker_id: str, ttl: float = LOCK_TTL) -> Call[bool]:
    """Reset the lock's TTL if this worker holds it; True when extended."""
    return Call(
        "lock.extend", [execution_id, worker_id, ttl], lambda result: bool(result["extended"])
    )


def is_workflow_locked(execution_id: str) -> Call[LockStatus]:
    return Call("lock.status", [execution_id], LockStatus.from_wire)


def cache_lease(key: str, lease_ttl: float, wait: float) -> Call[dict[str, Any]]:
    """The value, or the right to compute it (docs/protocol-extensions.md)."""
    return Call("cache.lease", [key, lease_ttl, wait], extra_timeout=wait)


def cache_fill(
    key: str, token: str, value: Any, ttl: float, stale_ttl: float
) -> Call[dict[str, Any]]:
    return Call("cache.fill", [key, token, value, ttl, stale_ttl])


def cache_abandon(key: str, token: str, error: str) -> Call[dict[str, Any]]:
    return Call("cache.abandon", [key, token, error])


def workflow_events(
    execution_id: str | None = None, since: int | None = None, limit: int = 100
) -> Call[list[WorkflowEvent]]:
    """The recorded history of workflow changes, oldest first, after ``since`` (epoch ms)."""
    return Call(
        "workflow.events",
        [execution_id, since, limit],
        lambda result: [WorkflowEvent.from_wire(event) for event in result["events"]],
    )
