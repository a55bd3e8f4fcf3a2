"""Workflow-execution tracking (DESIGN section 3.1).

Every change is read, compute, then ``swap_workflow``: a compare-and-set of
the state with its active-set and finished-index entries, retried when
another writer got there first. Two concurrent updates through any number of
daemons therefore never lose one another. ``stats`` and ``active_detailed``
read everything in one ``workflow_snapshot`` (one Redis round trip).

Progress and ETA use integer arithmetic on the exact fraction, rounding half
up as JavaScript's Math.round does, so wksd and the seed's app agree.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import trio

from clientlib.errors import BadRequest, Conflict, NotFound, WksError

from ..clock import Clock, now_ms
from ..keys import KeySpace
from ..store.base import Store, WorkflowSwap
from .values import MAX_STATE_BYTES, decode, encode

__all__ = ["FINISHED", "STALE_ERROR", "STATUSES", "Workflows"]

STATUSES: Final = ("pending", "running", "completed", "failed", "cancelled")
FINISHED: Final = frozenset({"completed", "failed", "cancelled"})

#: How long a finished state is kept (DESIGN section 4).
RETENTION_MS: Final = {"completed": 7_200_000, "failed": 3_600_000, "cancelled": 3_600_000}
MAX_RETENTION_MS: Final = max(RETENTION_MS.values())

STALE_ERROR: Final = "Workflow timed out or became unresponsive"

#: Compare-and-set attempts before an update gives up with CONFLICT. Each
#: failed attempt means another writer changed the same execution between
#: our read and our write; dozens in a row means a writer storm, and the
#: caller is better told than kept waiting.
MAX_SWAP_ATTEMPTS: Final = 32
#: After a lost compare-and-set, wait a random time up to this base doubled
#: per loss (capped below), so writers that collided do not collide again in
#: lockstep. The waits add up to about a second at most.
SWAP_BACKOFF_BASE: Final = 0.0005
SWAP_BACKOFF_CAP: Final = 0.05


@dataclass(frozen=True, slots=True)
class _Plan:
    state: dict[str, Any]
    ttl_ms: int
    active: bool
    finished_at: int | None = None


def _round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded as Math.round does, exactly."""
    return (2 * numerator + denominator) // (2 * denominator)


class Workflows:
    def __init__(self, store: Store, keys: KeySpace, clock: Clock, *, stale_after: float) -> None:
        self._store = store
        self._keys = keys
        self._clock = clock
        self.stale_after_ms = int(stale_after * 1000)
        #: Told of every change, with its event type (started, progress,
        #: completed, failed, cancelled, stale) and the new state.
        self.on_change: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
        # A running state outlives the stale threshold, so a stuck run is
        # found and marked failed by cleanup instead of silently expiring
        # (the seed's TTL equalled the threshold). Twice leaves room for any
        # cleanup interval up to the threshold itself.
        self.running_ttl_ms = 2 * self.stale_after_ms

    # -- the methods ---------------------------------------------------------
    async def start(
        self, execution_id: str, workflow_id: str, total_steps: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        encode(data, "data")

        def plan(current: dict[str, Any] | None, now: int) -> _Plan:
            if current is not None and current.get("status") not in FINISHED:
                raise Conflict(f"workflow {execution_id} is already active")
            state = {
                "executionId": execution_id,
                "workflowId": workflow_id,
                "status": "running",
                "progress": 0,
                "currentStep": "initializing",
                "totalSteps": total_steps,
                "completedSteps": 0,
                "data": data,
                "startedAt": now,
                "updatedAt": now,
            }
            return _Plan(state, self.running_ttl_ms, active=True)

        return await self._change(execution_id, plan, lambda state: "started")

    async def update(
        self,
        execution_id: str,
        completed_steps: int,
        current_step: str,
        data: dict[str, Any] | None,
    ) -> dict[str, Any]:
        def plan(current: dict[str, Any] | None, now: int) -> _Plan:
            current = self._existing(execution_id, current)
            total = current["totalSteps"]
            if not 0 <= completed_steps <= total:
                raise BadRequest(f"completed_steps must be between 0 and {total}")
            state = dict(current)
            state.pop("estimatedCompletion", None)
            merged = {**current.get("data", {}), **(data or {})}
            if data:
                encode(merged, "data")  # the merged data obeys the value limit
            started = current["startedAt"]
            state.update(
                status="running",
                completedSteps=completed_steps,
                currentStep=current_step,
                progress=_round_half_up(100 * completed_steps, total),
                data=merged,
                updatedAt=now,
            )
            if 0 < completed_steps < total:
                # startedAt + elapsed / fraction, with fraction = completed / total.
                elapsed = max(0, now - started)
                state["estimatedCompletion"] = started + _round_half_up(
                    elapsed * total, completed_steps
                )
            return _Plan(state, self.running_ttl_ms, active=True)

        return await self._change(execution_id, plan, lambda state: "progress")

    async def complete(
        self,
        execution_id: str,
        status: str,
        error: str | None,
        final_data: dict[str, Any] | None,
    ) -> dict[str, Any]:
        def plan(current: dict[str, Any] | None, now: int) -> _Plan:
            current = self._existing(execution_id, current)
            state = dict(current)
            state.pop("estimatedCompletion", None)
            if final_data:
                state["data"] = {**current.get("data", {}), **final_data}
                encode(state["data"], "data")
            state.update(status=status, updatedAt=now, completedAt=now)
            if status == "completed":
                state["progress"] = 100
            if error is not None:
                state["error"] = error
            return _Plan(state, RETENTION_MS[status], active=False, finished_at=now)

        return await self._change(execution_id, plan, lambda state: str(state["status"]))

    async def get(self, execution_id: str) -> dict[str, Any] | None:
        raw = await self._store.get(self._keys.workflow(execution_id))
        return None if raw is None else decode(raw)

    async def active(self) -> dict[str, Any]:
        ids = await self._store.members(self._keys.active)
        return {"activeExecutions": ids, "count": len(ids)}

    async def active_detailed(self) -> dict[str, Any]:
        snapshot = await self._store.workflow_snapshot(self._keys, None)
        states = [_decoded(raw) for _, raw in snapshot.active if raw is not None]
        workflows = [state for state in states if state is not None]
        return {"workflows": workflows, "count": len(workflows)}

    async def stats(self) -> dict[str, Any]:
        now = now_ms(self._clock)
        snapshot = await self._store.workflow_snapshot(self._keys, now - MAX_RETENTION_MS)
        by_status = dict.fromkeys(STATUSES, 0)
        seen: set[str] = set()
        progress: list[int] = []
        for execution_id, raw in snapshot.active:
            state = _decoded(raw)
            if state is not None and state.get("status") in by_status:
                seen.add(execution_id)
                by_status[state["status"]] += 1
                progress.append(int(state.get("progress", 0)))
        for raw in snapshot.finished:
            state = _decoded(raw)
            if (
                state is not None
                and state.get("executionId") not in seen
                and state.get("status") in by_status
            ):
                seen.add(state["executionId"])
                by_status[state["status"]] += 1
        average = _round_half_up(sum(progress), len(progress)) if progress else 0
        return {
            "activeExecutions": len(snapshot.active),
            "executionsByStatus": by_status,
            "averageProgress": average,
        }

    async def cleanup(self) -> dict[str, int]:
        """Prune the active set and fail stale runs; counts of each outcome."""
        now = now_ms(self._clock)
        snapshot = await self._store.workflow_snapshot(self._keys, None)
        cleaned = errors = 0
        for execution_id, raw in snapshot.active:
            try:
                swap = self._cleanup_swap(execution_id, raw, now)
                if swap is not None and await self._store.swap_workflow(self._keys, swap):
                    cleaned += 1
                    if swap.new is not None:  # a stale run, now failed
                        await self._announce("stale", decode(swap.new))
            except WksError:
                errors += 1
        return {"cleaned": cleaned, "errors": errors}

    # -- internals -----------------------------------------------------------
    def _cleanup_swap(self, execution_id: str, raw: bytes | None, now: int) -> WorkflowSwap | None:
        if raw is None:  # the state expired or was deleted: leave the set
            return WorkflowSwap(execution_id, None, None, None, active=False)
        state = decode(raw)
        if state.get("status") in FINISHED:
            finished_at = state.get("completedAt") or state.get("updatedAt") or now
            return WorkflowSwap(
                execution_id,
                raw,
                None,
                None,
                active=False,
                finished_at=finished_at,
                retain_since=now - MAX_RETENTION_MS,
            )
        if now - int(state.get("updatedAt", 0)) <= self.stale_after_ms:
            return None
        state = dict(state)
        state.pop("estimatedCompletion", None)
        state.update(status="failed", error=STALE_ERROR, updatedAt=now, completedAt=now)
        return WorkflowSwap(
            execution_id,
            raw,
            encode(state, "state", MAX_STATE_BYTES),
            RETENTION_MS["failed"],
            active=False,
            finished_at=now,
            retain_since=now - MAX_RETENTION_MS,
        )

    async def _announce(self, kind: str, state: dict[str, Any]) -> None:
        if self.on_change is not None:
            await self.on_change(kind, state)

    @staticmethod
    def _existing(execution_id: str, current: dict[str, Any] | None) -> dict[str, Any]:
        if current is None:
            raise NotFound(f"no workflow {execution_id}")
        if current.get("status") in FINISHED:
            raise Conflict(f"workflow {execution_id} is already {current['status']}")
        return current

    async def _change(
        self,
        execution_id: str,
        plan: Callable[[dict[str, Any] | None, int], _Plan],
        kind: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:
        key = self._keys.workflow(execution_id)
        for attempt in range(MAX_SWAP_ATTEMPTS):
            raw = await self._store.get(key)
            decision = plan(None if raw is None else decode(raw), now_ms(self._clock))
            swap = WorkflowSwap(
                execution_id,
                expected=raw,
                new=encode(decision.state, "state", MAX_STATE_BYTES),
                ttl_ms=decision.ttl_ms,
                active=decision.active,
                finished_at=decision.finished_at,
                retain_since=now_ms(self._clock) - MAX_RETENTION_MS,
            )
            if await self._store.swap_workflow(self._keys, swap):
                await self._announce(kind(decision.state), decision.state)
                return decision.state
            cap = min(SWAP_BACKOFF_CAP, SWAP_BACKOFF_BASE * 2**attempt)
            await trio.sleep(random.uniform(0, cap))
        raise Conflict(f"workflow {execution_id} kept changing under us; try again")


def _decoded(raw: bytes | None) -> dict[str, Any] | None:
    """A stored state for reporting; None when absent or unreadable."""
    if raw is None:
        return None
    try:
        state = decode(raw)
    except WksError:
        return None
    return state if isinstance(state, dict) else None
