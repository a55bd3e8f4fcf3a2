"""Every client method, written once, as a description of the call.

Each function here takes the method's Python arguments and returns a
``Call``: the wire method, its params, and how to turn the raw result into
the typed value the caller gets. The sync client runs a ``Call`` over a
blocking socket and the async clients await it; neither repeats a method's
arguments, defaults or conversions.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

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
from .errors import ComputeFailed, RequestTimeout

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
) -> Call[LockResult]:
    """Take the execution lock; the result carries the fencing token.

    ``keepalive``: the daemon extends the lock while this connection is open
    and releases it when the connection closes. ``wait``: seconds to queue for
    the lock if another worker holds it (0: answer at once).
    """
    return Call(
        "lock.acquire",
        [execution_id, worker_id, ttl, keepalive, wait],
        LockResult.from_wire,
        extra_timeout=wait,
    )


def lock_workflow_execution(
    execution_id: str,
    worker_id: str,
    ttl: float = LOCK_TTL,
    keepalive: bool = False,
    wait: float = 0,
) -> Call[bool]:
    """Take the execution lock (see ``acquire_lock``); True when this worker holds it."""
    call = acquire_lock(execution_id, worker_id, ttl, keepalive, wait)
    return Call(
        call.method, call.params, lambda result: bool(result["acquired"]), call.extra_timeout
    )


def unlock_workflow_execution(execution_id: str, worker_id: str) -> Call[bool]:
    """Release the lock if this worker holds it; True when it was released."""
    return Call("lock.release", [execution_id, worker_id], lambda result: bool(result["released"]))


def release_lock(execution_id: str, worker_id: str) -> Call[str]:
    """Release the lock if this worker holds it; the status (``released``,
    ``not_owner``, ``not_found``), for ``execute_with_lock``."""
    return Call("lock.release", [execution_id, worker_id], lambda result: str(result["status"]))


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


def lease_outcome(key: str, answer: dict[str, Any]) -> tuple[bool, Any]:
    """What a ``cache.lease`` answer means for ``get_or_compute``, in both clients.

    ``(True, value)``: return the value. ``(False, token)``: compute it, then
    fill (or abandon) with the token. Raises ``ComputeFailed`` when the caller
    computing it failed, ``RequestTimeout`` when waiting for it ran out.
    """
    status = answer.get("status")
    if status == "hit":
        return True, answer["value"]
    if status == "stale":
        token = answer.get("token")
        return (True, answer["value"]) if token is None else (False, token)
    if status == "lease":
        return False, answer["token"]
    if status == "failed":
        raise ComputeFailed(str(answer.get("error")))
    raise RequestTimeout(f"waited too long for another caller to compute {key!r}")


def describe_failure(exc: BaseException) -> str:
    """What the waiting callers are told when ``fn`` raised ``exc``."""
    return f"{type(exc).__name__}: {exc}"[:4096]


def jittered(ttl: float, jitter: float) -> float:
    """``ttl`` moved by up to ``jitter`` of itself either way, so entries written
    together do not all expire together."""
    if jitter <= 0:
        return ttl
    return ttl * (1 + random.uniform(-jitter, jitter))


def workflow_events(
    execution_id: str | None = None, since: int | None = None, limit: int = 100
) -> Call[list[WorkflowEvent]]:
    """The recorded history of workflow changes, oldest first, after ``since`` (epoch ms)."""
    return Call(
        "workflow.events",
        [execution_id, since, limit],
        lambda result: [WorkflowEvent.from_wire(event) for event in result["events"]],
    )
