"""Typed results: the daemon's camelCase maps as snake_case dataclasses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "WORKFLOW_EVENT_TYPES",
    "CleanupResult",
    "Health",
    "LockResult",
    "LockStatus",
    "WorkflowEvent",
    "WorkflowState",
    "WorkflowStats",
]

#: What a workflow event can say happened (docs/protocol-extensions.md).
WORKFLOW_EVENT_TYPES = ("started", "progress", "completed", "failed", "cancelled", "stale")


@dataclass(frozen=True, slots=True)
class WorkflowState:
    """One workflow execution (DESIGN section 3.1); times in epoch ms.

    ``progress`` is None where the seed's app wrote ``null`` (a run of zero
    total steps: JavaScript's ``Math.round(0 / 0 * 100)``); fields a state
    written by another program lacks take empty defaults.
    """

    execution_id: str
    workflow_id: str
    status: str
    progress: int | None
    current_step: str
    total_steps: int
    completed_steps: int
    data: dict[str, Any]
    started_at: int
    updated_at: int
    estimated_completion: int | None = None
    completed_at: int | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in ("completed", "failed", "cancelled")

    @classmethod
    def from_wire(cls, state: dict[str, Any]) -> WorkflowState:
        return cls(
            execution_id=state.get("executionId", ""),
            workflow_id=state.get("workflowId", ""),
            status=state.get("status", ""),
            progress=state.get("progress", 0),
            current_step=state.get("currentStep", ""),
            total_steps=state.get("totalSteps", 0),
            completed_steps=state.get("completedSteps", 0),
            data=state.get("data") or {},
            started_at=state.get("startedAt", 0),
            updated_at=state.get("updatedAt", 0),
            estimated_completion=state.get("estimatedCompletion"),
            completed_at=state.get("completedAt"),
            error=state.get("error"),
        )


@dataclass(frozen=True, slots=True)
class WorkflowEvent:
    """One change of a workflow: ``type`` is one of WORKFLOW_EVENT_TYPES, ``at`` epoch ms."""

    execution_id: str
    type: str
    state: WorkflowState
    at: int

    @classmethod
    def from_wire(cls, event: dict[str, Any]) -> WorkflowEvent:
        return cls(
            execution_id=event["executionId"],
            type=event["type"],
            state=WorkflowState.from_wire(event["state"]),
            at=event["at"],
        )


class LockWatch:
    """What a client knows of one keepalive lock after granting it (internal).

    ``reason`` is None while the lock is held, else why it ended; ``on_lost``
    is the caller's callback; ``poll`` reads what the daemon has sent without
    waiting (the sync client's, so that checking ``LockResult.lost`` sees a
    push that has arrived).
    """

    __slots__ = ("on_lost", "poll", "reason")

    def __init__(self) -> None:
        self.reason: str | None = None
        self.on_lost: Callable[[LockResult], object] | None = None
        self.poll: Callable[[], None] | None = None


@dataclass(frozen=True, slots=True)
class LockResult:
    """The answer to an acquire: truthy when the lock is yours.

    ``worker_id`` is the holder (you, or whoever has it), ``fencing_token``
    grows with every fresh acquisition of the execution id, ``expires_at`` is
    epoch ms. The last two are None when the lock was not acquired.

    For a keepalive lock (``execute_with_lock``'s, or ``acquire_lock`` with
    ``keepalive=True``), ``lost`` turns true when the client learns that the
    lock ended before this worker released it, and ``lost_reason`` says why:
    ``expired`` (the daemon could not extend it in time: Redis unreachable),
    ``not_owner`` / ``not_found`` (it expired and another worker took it, or
    it was deleted), ``released`` (released through another connection), or
    ``disconnected`` (the connection that kept it ended, and with it the
    lock). A plain lock is never reported lost: nothing watches it.
    """

    acquired: bool
    worker_id: str | None
    fencing_token: int | None = None
    expires_at: int | None = None
    _watch: LockWatch = field(default_factory=LockWatch, compare=False, repr=False)

    def __bool__(self) -> bool:
        return self.acquired

    @property
    def lost(self) -> bool:
        """Whether this keepalive lock is known to have ended (see the class doc)."""
        watch = self._watch
        if watch.reason is None and watch.poll is not None:
            watch.poll()
        return watch.reason is not None

    @property
    def lost_reason(self) -> str | None:
        """Why the lock was lost; None while it is not known to be."""
        return self._watch.reason

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> LockResult:
        return cls(
            acquired=bool(result["acquired"]),
            worker_id=result.get("workerId"),
            fencing_token=result.get("fencingToken"),
            expires_at=result.get("expiresAt"),
        )


@dataclass(frozen=True, slots=True)
class LockStatus:
    """Who holds a lock; ``ttl`` is the time left in ms."""

    locked: bool
    worker_id: str | None
    ttl: int | None

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> LockStatus:
        return cls(bool(result["locked"]), result.get("workerId"), result.get("ttl"))


@dataclass(frozen=True, slots=True)
class WorkflowStats:
    active_executions: int
    executions_by_status: dict[str, int]
    average_progress: int

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> WorkflowStats:
        return cls(
            result["activeExecutions"],
            dict(result["executionsByStatus"]),
            result["averageProgress"],
        )


@dataclass(frozen=True, slots=True)
class CleanupResult:
    cleaned: int
    errors: int

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> CleanupResult:
        return cls(result["cleaned"], result["errors"])


@dataclass(frozen=True, slots=True)
class Health:
    """The health document (DESIGN section 7)."""

    status: str
    backend: str
    redis_status: str
    redis_latency: float | None
    memory_keys: int
    uptime: float
    version: str
    checks: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> Health:
        checks = result.get("checks", {})
        redis = checks.get("redis", {})
        memory = checks.get("memory", {})
        return cls(
            status=result["status"],
            backend=result["backend"],
            redis_status=redis.get("status", "disabled"),
            redis_latency=redis.get("latency"),
            memory_keys=memory.get("keys", 0),
            uptime=result.get("uptime", 0),
            version=result.get("version", ""),
            checks=checks,
        )
