"""The method table: DESIGN section 3's methods and docs/protocol-extensions.md's.

Each row (a ``wksd.dispatch.Method``) names a method, its parameters with
the check that types each one, the handler that gets them, and the
presenter that turns the handler's typed result (an ``Acquisition``, a
``WorkflowStats``, a ``LeaseAnswer``...) into the camelCase map the wire
carries. The services below know nothing of the wire's spelling, and the
wire's spelling is all here: the checks first, then the presenters, then
the table.

A check takes the parameter's name and its raw msgpack value and returns
the typed value, or raises ``BadRequest`` naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any, Final, Protocol

from clientlib.errors import BadRequest

from .coordination.feeds import MAX_HISTORY, Feeds
from .coordination.holds import Holds
from .coordination.singleflight import LeaseAnswer, LeaseStatus, SingleFlight
from .dispatch import REQUIRED, Check, Method, Param
from .domain import (
    Acquisition,
    Cleanup,
    Documents,
    Locks,
    LockState,
    LockStatus,
    Workflows,
    WorkflowStats,
    WorkflowStatus,
)
from .domain.values import MAX_SAFE_INTEGER, MAX_TEXT_BYTES
from .domain.workflows import FINISHED

__all__ = ["MAX_ID_BYTES", "MAX_TTL_SECONDS", "DaemonMethods", "method_table"]

#: Identifiers are non-empty strings of at most this many bytes (DESIGN 3).
MAX_ID_BYTES: Final = 256
#: TTLs above ten years are surely mistakes; they would pin a key for good.
MAX_TTL_SECONDS: Final = 10 * 365 * 86400

# Default TTLs, in seconds (DESIGN section 4).
SESSION_TTL: Final = 86400.0
CACHE_TTL: Final = 3600.0
LOCK_TTL: Final = 300.0
#: A computing caller's lease, and how long others wait for it by default:
#: long enough for a slow API call, short enough that a hung one is replaced.
LEASE_TTL: Final = 30.0
#: The longest a lock.acquire or cache.lease may wait: an hour.
MAX_WAIT: Final = 3600.0
#: workflow.events answers this many events when no limit is given.
DEFAULT_HISTORY: Final = 100


# -- parameter checks ----------------------------------------------------------
def identifier(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string")
    if len(value) > MAX_ID_BYTES:  # more characters than bytes allowed: too long anyway
        raise BadRequest(f"{name} is longer than {MAX_ID_BYTES} bytes")
    if not value.isascii():
        try:
            size = len(value.encode())
        except UnicodeEncodeError:  # a lone surrogate, from a text line's "\ud83d"
            raise BadRequest(f"{name} must be valid Unicode (no lone surrogates)") from None
        if size > MAX_ID_BYTES:
            raise BadRequest(f"{name} is longer than {MAX_ID_BYTES} bytes")
    return value


def text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string")
    if len(value) > MAX_TEXT_BYTES // 4:
        try:
            size = len(value.encode())
        except UnicodeEncodeError:
            size = len(value.encode(errors="surrogatepass"))  # stored as JSON escapes
        if size > MAX_TEXT_BYTES:
            raise BadRequest(f"{name} is longer than {MAX_TEXT_BYTES} bytes")
    return value


def ttl(name: str, value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value <= 0:
        raise BadRequest(f"{name} must be a number of seconds greater than 0")
    if value > MAX_TTL_SECONDS:
        raise BadRequest(f"{name} must be at most {MAX_TTL_SECONDS} seconds")
    return float(value)


def mapping(name: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest(f"{name} must be a map")
    return value


def anything(name: str, value: Any) -> Any:
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false")
    return value


def seconds(high: float) -> Check:
    """A duration from 0 up to ``high`` seconds (0 allowed: "do not wait")."""

    def check(name: str, value: Any) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or not 0 <= value <= high:
            raise BadRequest(f"{name} must be a number of seconds from 0 to {high}")
        return float(value)

    return check


def bounded(low: int, high: int) -> Check:
    def check(name: str, value: Any) -> int:
        if type(value) is not int or not low <= value <= high:
            raise BadRequest(f"{name} must be an integer from {low} to {high}")
        return value

    return check


def integer(low: int) -> Check:
    def check(name: str, value: Any) -> int:
        if type(value) is not int or not low <= value <= MAX_SAFE_INTEGER:
            raise BadRequest(f"{name} must be an integer from {low} to {MAX_SAFE_INTEGER}")
        return value

    return check


def finish_status(name: str, value: Any) -> WorkflowStatus:
    if not isinstance(value, str) or value not in FINISHED:  # a list is unhashable
        raise BadRequest(f"{name} must be one of {', '.join(sorted(FINISHED))}")
    return WorkflowStatus(value)


def param(name: str, check: Check, default: Any = REQUIRED) -> Param:
    """A row's parameter; a string one (``identifier``, ``text``) also takes
    the text protocol's bare integers as their digits."""
    return Param(name, check, default, textual=check in (identifier, text))


# -- presenters: typed results -> the wire's maps --------------------------------
def present_acquisition(answer: Acquisition) -> dict[str, Any]:
    return {
        "acquired": answer.acquired,
        "workerId": answer.holder,
        "fencingToken": answer.token,
        "expiresAt": answer.expires_at,
    }


def present_release(status: LockStatus) -> dict[str, Any]:
    return {"released": status is LockStatus.RELEASED, "status": status.value}


def present_extension(status: LockStatus) -> dict[str, Any]:
    return {"extended": status is LockStatus.EXTENDED, "status": status.value}


def present_lock_state(state: LockState) -> dict[str, Any]:
    return {"locked": state.holder is not None, "workerId": state.holder, "ttl": state.ttl_ms}


def present_active(ids: list[str]) -> dict[str, Any]:
    return {"activeExecutions": ids, "count": len(ids)}


def present_detailed(states: list[dict[str, Any]]) -> dict[str, Any]:
    return {"workflows": states, "count": len(states)}


def present_stats(stats: WorkflowStats) -> dict[str, Any]:
    return {
        "activeExecutions": stats.active_executions,
        "executionsByStatus": {status.value: n for status, n in stats.by_status.items()},
        "averageProgress": stats.average_progress,
    }


def present_cleanup(cleanup: Cleanup) -> dict[str, int]:
    return {"cleaned": cleanup.cleaned, "errors": cleanup.errors}


def present_subscribed(execution_id: str | None) -> dict[str, Any]:
    return {"subscribed": execution_id}


def present_unsubscribed(subscribed: bool) -> dict[str, Any]:
    return {"unsubscribed": subscribed}


def present_events(events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"events": events}


def present_lease(answer: LeaseAnswer) -> dict[str, Any]:
    """``status``, then the fields that status has, in the order the wire has them."""
    wire: dict[str, Any] = {"status": answer.status.value}
    if answer.status in (LeaseStatus.HIT, LeaseStatus.STALE):
        wire["value"] = answer.value
    if answer.status in (LeaseStatus.STALE, LeaseStatus.LEASE):
        wire["token"] = answer.token
    if answer.status is LeaseStatus.FAILED:
        wire["error"] = answer.error
    return wire


def present_filled(ours: bool) -> dict[str, Any]:
    return {"filled": ours}


def present_abandoned(ours: bool) -> dict[str, Any]:
    return {"abandoned": ours}


# -- the table ---------------------------------------------------------------------
class DaemonMethods(Protocol):
    """The methods that belong to the daemon itself."""

    async def ping(self) -> str: ...

    async def health(self) -> dict[str, Any]: ...

    async def metrics_text(self) -> str: ...

    async def cleanup(self) -> Cleanup:
        """``workflow.cleanup``, counted and logged."""
        ...


def method_table(
    daemon: DaemonMethods,
    *,
    sessions: Documents,
    cache: Documents,
    workflows: Workflows,
    locks: Locks,
    holds: Holds,
    feeds: Feeds,
    flights: SingleFlight,
) -> list[Method]:
    """Every method, bound to the services that answer it."""
    return [
        Method("ping", (), daemon.ping),
        Method("health", (), daemon.health),
        Method("metrics", (), daemon.metrics_text),
        *_session_methods(sessions),
        *_cache_methods(cache),
        *_workflow_methods(workflows, daemon),
        *_lock_methods(locks, holds),
        *_feed_methods(feeds),
        *_flight_methods(flights),
    ]


_EXECUTION: Final = param("execution_id", identifier)
_WORKER: Final = param("worker_id", identifier)
_USER: Final = param("user_id", identifier)
_KEY: Final = param("key", identifier)
#: workflow.subscribe, unsubscribe and events: one execution, or (nil) all.
_ANY_EXECUTION: Final = param("execution_id", identifier, None)


def _session_methods(sessions: Documents) -> list[Method]:
    return [
        Method(
            "session.set",
            (_USER, param("data", mapping), param("ttl", ttl, SESSION_TTL)),
            sessions.set,
        ),
        Method("session.get", (_USER,), sessions.get),
        Method("session.delete", (_USER,), sessions.delete),
        Method("session.touch", (_USER, param("ttl", ttl, SESSION_TTL)), sessions.touch),
    ]


def _cache_methods(cache: Documents) -> list[Method]:
    return [
        Method(
            "cache.set",
            (_KEY, param("value", anything), param("ttl", ttl, CACHE_TTL)),
            cache.set,
        ),
        Method("cache.get", (_KEY,), cache.get),
        Method("cache.delete", (_KEY,), cache.delete),
    ]


def _workflow_methods(workflows: Workflows, daemon: DaemonMethods) -> list[Method]:
    return [
        Method(
            "workflow.start",
            (
                _EXECUTION,
                param("workflow_id", identifier),
                param("total_steps", integer(1)),
                param("data", mapping, {}),
            ),
            workflows.start,
        ),
        Method(
            "workflow.update",
            (
                _EXECUTION,
                param("completed_steps", integer(0)),
                param("current_step", text),
                param("data", mapping, None),
            ),
            workflows.update,
        ),
        Method(
            "workflow.complete",
            (
                _EXECUTION,
                param("status", finish_status),
                param("error", text, None),
                param("final_data", mapping, None),
            ),
            workflows.complete,
        ),
        Method("workflow.get", (_EXECUTION,), workflows.get),
        Method("workflow.active", (), workflows.active, present=present_active),
        Method("workflow.active_detailed", (), workflows.active_detailed, present=present_detailed),
        Method("workflow.stats", (), workflows.stats, present=present_stats),
        Method("workflow.cleanup", (), daemon.cleanup, admin=True, present=present_cleanup),
    ]


def _lock_methods(locks: Locks, holds: Holds) -> list[Method]:
    return [
        Method(
            "lock.acquire",
            (
                _EXECUTION,
                _WORKER,
                param("ttl", ttl, LOCK_TTL),
                param("keepalive", flag, False),
                param("wait", seconds(MAX_WAIT), 0.0),
            ),
            holds.acquire,
            session=True,
            present=present_acquisition,
        ),
        Method(
            "lock.release",
            (_EXECUTION, _WORKER),
            holds.release,
            session=True,
            present=present_release,
        ),
        Method(
            "lock.extend",
            (_EXECUTION, _WORKER, param("ttl", ttl, LOCK_TTL)),
            locks.extend,
            present=present_extension,
        ),
        Method("lock.status", (_EXECUTION,), locks.status, present=present_lock_state),
    ]


def _feed_methods(feeds: Feeds) -> list[Method]:
    return [
        Method(
            "workflow.subscribe",
            (_ANY_EXECUTION,),
            feeds.subscribe,
            session=True,
            present=present_subscribed,
        ),
        Method(
            "workflow.unsubscribe",
            (_ANY_EXECUTION,),
            feeds.unsubscribe,
            session=True,
            present=present_unsubscribed,
        ),
        Method(
            "workflow.events",
            (
                _ANY_EXECUTION,
                param("since_ms", integer(0), None),
                param("limit", bounded(1, MAX_HISTORY), DEFAULT_HISTORY),
            ),
            feeds.history,
            present=present_events,
        ),
    ]


def _flight_methods(flights: SingleFlight) -> list[Method]:
    return [
        Method(
            "cache.lease",
            (
                _KEY,
                param("lease_ttl", ttl, LEASE_TTL),
                param("wait", seconds(MAX_WAIT), LEASE_TTL),
            ),
            flights.lease,
            session=True,
            present=present_lease,
        ),
        Method(
            "cache.fill",
            (
                _KEY,
                param("token", identifier),
                param("value", anything),
                param("ttl", ttl, CACHE_TTL),
                param("stale_ttl", seconds(MAX_TTL_SECONDS), 0.0),
            ),
            flights.fill,
            session=True,
            present=present_filled,
        ),
        Method(
            "cache.abandon",
            (_KEY, param("token", identifier), param("error", text, None)),
            flights.abandon,
            session=True,
            present=present_abandoned,
        ),
    ]
