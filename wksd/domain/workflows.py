"""Workflow-execution tracking (DESIGN section 3.1).

Every change is read, compute, then ``swap_workflow``: a compare-and-set of
the state with its active-set and finished-index entries, retried when
another writer got there first. Two concurrent updates through any number of
daemons therefore never lose one another. ``stats`` and ``active_detailed``
read everything in one ``workflow_snapshot`` (one Redis round trip). A lost
compare-and-set waits a moment through the ``sleep`` it is given (the
daemon's ``trio.sleep``), so this module needs no event loop of its own.

A state is answered as the document it is stored as (the seed's camelCase
JSON map); the counts are typed (``WorkflowStats``, ``Cleanup``) and become
wire maps in the method table. ``WorkflowStatus`` names the five statuses.

Progress is computed as the seed computes it, ``Math.round((completed /
total) * 100)`` in IEEE doubles (``js_progress``: 23 of 40 is 57, since the
double is 57.49999999999999), so both programs write the same number; with
``totalSteps`` 0 that is NaN, which JSON writes as null. The ETA uses
integer arithmetic on the exact fraction.

Stored states are read as whoever wrote them wrote them (the seed's app
too), and no handler fails on their shape:

- a state that is not a JSON map is *unreadable*: ``get`` answers it as it
  is, ``update`` and ``complete`` are CONFLICT, ``start`` replaces it,
  ``cleanup`` counts it as an error and leaves it, ``stats`` counts it as
  existing but under no status;
- ``status`` missing or not one of the five names: not finished (``update``
  and ``complete`` go ahead, ``start`` is CONFLICT), counted under no status;
- ``totalSteps`` not a whole number >= 0: ``update`` is CONFLICT;
- ``data`` null (or not a map): merged data replaces it, no data leaves it;
- ``progress`` not a number counts as 0 in the average (JavaScript's null);
- times not numbers: no ETA without ``startedAt``; ``cleanup`` judges
  staleness by ``updatedAt``, else ``startedAt``, else calls the run stale.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final, Protocol, TypeVar

from clientlib.errors import BadRequest, Conflict, InternalError, NotFound, WksError

from ..clock import Clock, now_ms
from ..keys import KeySpace
from ..store.base import Store, WorkflowEvent, WorkflowSwap
from .values import MAX_SAFE_INTEGER, MAX_STATE_BYTES, Decoded, decode, encode

__all__ = [
    "FINISHED",
    "MAX_KNOWN_BYTES",
    "MAX_KNOWN_STATE_BYTES",
    "STALE_ERROR",
    "Cleanup",
    "Feed",
    "WorkflowStats",
    "WorkflowStatus",
    "Workflows",
    "js_progress",
    "js_round",
    "running_ttl_ms",
]


class WorkflowStatus(StrEnum):
    """A state's ``status``, the five names DESIGN section 3.1 gives."""

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


#: The statuses ``workflow.complete`` may set; a run in one of them is over.
FINISHED: Final = frozenset(
    {WorkflowStatus.COMPLETED, WorkflowStatus.FAILED, WorkflowStatus.CANCELLED}
)

#: How long a finished state is kept (DESIGN section 4).
RETENTION_MS: Final = {
    WorkflowStatus.COMPLETED: 7_200_000,
    WorkflowStatus.FAILED: 3_600_000,
    WorkflowStatus.CANCELLED: 3_600_000,
}
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
class WorkflowStats:
    """``workflow.stats``: states that exist in the active set, every run by
    status (finished ones within their retention), and the mean progress of
    the active ones (rounded as JavaScript rounds)."""

    active_executions: int
    by_status: dict[WorkflowStatus, int]
    average_progress: int


@dataclass(frozen=True, slots=True)
class Cleanup:
    """``workflow.cleanup``: active-set entries cleaned (gone, finished or
    stale), and entries it could not clean (a state not a map, a store error)."""

    cleaned: int
    errors: int


@dataclass(frozen=True, slots=True)
class _Plan:
    state: dict[str, Any]
    ttl_ms: int
    active: bool
    finished_at: int | None = None


def _round_half_up(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded half up, exactly (for the ETA)."""
    return (2 * numerator + denominator) // (2 * denominator)


def js_round(x: float) -> int | None:
    """JavaScript's Math.round(x); None (JSON's null) for NaN and the infinities.

    Not floor(x + 0.5): for 0.49999999999999994 that sum rounds up to 1.0 in
    doubles, where JavaScript answers 0. x - floor(x) is exact.
    """
    if not math.isfinite(x):
        return None
    whole = math.floor(x)
    return whole + 1 if x - whole >= 0.5 else whole


def js_progress(completed: int, total: int) -> int | None:
    """The seed's ``Math.round((completed / total) * 100)``, in IEEE doubles."""
    if total == 0:
        return None  # 0 / 0 is NaN (and c / 0 Infinity): JSON.stringify writes null
    return js_round((completed / total) * 100)


class _Unreadable:
    """A stored state that is not a JSON map (see the module docstring)."""


_UNREADABLE: Final = _Unreadable()

_Current = dict[str, Any] | _Unreadable | None


def _read_state(raw: bytes | None) -> _Current:
    if raw is None:
        return None
    try:
        state = decode(raw)
    except WksError:
        return _UNREADABLE
    return state if isinstance(state, dict) else _UNREADABLE


def _status(state: Any) -> WorkflowStatus | None:
    """The state's status when it is one of the five, else None."""
    status = state.get("status") if isinstance(state, dict) else None
    try:
        return WorkflowStatus(status) if isinstance(status, str) else None
    except ValueError:  # a name of another program's
        return None


def _is_finished(state: dict[str, Any]) -> bool:
    return _status(state) in FINISHED


def _number(value: Any) -> float | int | None:
    """A stored number a JavaScript program could have written, else None."""
    if type(value) in (int, float) and -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
        return value  # type: ignore[no-any-return]
    return None  # not a number, a bool, NaN, an infinity, or too large


def _ms(value: Any) -> int | None:
    """A stored time (ms), when it is a number."""
    number = _number(value)
    return None if number is None else int(number)


def _merged(base: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """``{...base, ...extra}``: a base that is not a map (null) adds nothing."""
    return {**(base if isinstance(base, dict) else {}), **extra}


def running_ttl_ms(stale_after: float) -> int:
    """The TTL of a running state whose run is stale after ``stale_after`` seconds.

    A running state outlives the stale threshold, so a stuck run is found and
    marked failed by cleanup instead of silently expiring (the seed's TTL
    equalled the threshold). Twice leaves room for any cleanup interval up to
    the threshold itself.
    """
    return 2 * int(stale_after * 1000)


_News = TypeVar("_News")


class Feed(Protocol[_News]):
    """Where the news of every change goes (``wksd.coordination.feeds.Feeds``)."""

    def prepare(self, kind: str, state: dict[str, Any]) -> tuple[WorkflowEvent, _News]:
        """The event of a change about to be written (``kind``: its event type,
        started, progress, completed, failed, cancelled or stale; ``state``: the
        new state): as the swap records and publishes it, and as news for
        ``deliver`` once the swap is applied."""
        ...

    def deliver(self, news: _News) -> None: ...


#: The states this daemon wrote last are kept for the next change's
#: compare-and-set (``Workflows``): at most this many bytes of JSON, and no
#: state over ``MAX_KNOWN_STATE_BYTES``.
MAX_KNOWN_BYTES: Final = 2 * 1024 * 1024
MAX_KNOWN_STATE_BYTES: Final = 64 * 1024


class Workflows:
    def __init__(
        self,
        store: Store,
        keys: KeySpace,
        clock: Clock,
        *,
        stale_after: float,
        sleep: Callable[[float], Awaitable[None]],
        feed: Feed[Any] | None = None,
    ) -> None:
        """``sleep(seconds)`` waits between compare-and-set attempts (``trio.sleep``
        in the daemon); ``feed`` makes the event of every change."""
        self._store = store
        self._keys = keys
        self._clock = clock
        self._sleep = sleep
        self._feed = feed
        # execution id -> (JSON, decoded) of the state this daemon wrote last,
        # most recently written last; ``_known_bytes`` counts the JSON.
        self._known: OrderedDict[str, tuple[bytes, dict[str, Any]]] = OrderedDict()
        self._known_bytes = 0
        self._decoded = Decoded(MAX_KNOWN_BYTES)
        self.stale_after_ms = int(stale_after * 1000)
        self.running_ttl_ms = running_ttl_ms(stale_after)

    # -- the methods ---------------------------------------------------------
    async def start(
        self, execution_id: str, workflow_id: str, total_steps: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        encode(data, "data")

        def plan(current: _Current, now: int) -> _Plan:
            if isinstance(current, dict) and not _is_finished(current):
                raise Conflict(f"workflow {execution_id} is already active")
            state = {
                "executionId": execution_id,
                "workflowId": workflow_id,
                "status": WorkflowStatus.RUNNING,
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
        def plan(current: _Current, now: int) -> _Plan:
            state = dict(self._existing(execution_id, current))
            total = state.get("totalSteps")
            if type(total) is not int or not 0 <= total <= MAX_SAFE_INTEGER:
                raise Conflict(
                    f"workflow {execution_id} has no totalSteps (a whole number >= 0)"
                    " to count steps against"
                )
            if not 0 <= completed_steps <= total:
                raise BadRequest(f"completed_steps must be between 0 and {total}")
            state.pop("estimatedCompletion", None)
            if data is not None:
                state["data"] = _encode_checked(_merged(state.get("data"), data))
            state.update(
                status=WorkflowStatus.RUNNING,
                completedSteps=completed_steps,
                currentStep=current_step,
                progress=js_progress(completed_steps, total),
                updatedAt=now,
            )
            started = _ms(state.get("startedAt"))
            if started is not None and 0 < completed_steps < total:
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
        status: WorkflowStatus,
        error: str | None,
        final_data: dict[str, Any] | None,
    ) -> dict[str, Any]:
        def plan(current: _Current, now: int) -> _Plan:
            state = dict(self._existing(execution_id, current))
            state.pop("estimatedCompletion", None)
            if final_data is not None:
                state["data"] = _encode_checked(_merged(state.get("data"), final_data))
            state.update(status=status, updatedAt=now, completedAt=now)
            if status == WorkflowStatus.COMPLETED:
                state["progress"] = 100
            if error is not None:
                state["error"] = error
            return _Plan(state, RETENTION_MS[status], active=False, finished_at=now)

        return await self._change(execution_id, plan, lambda state: str(state["status"]))

    async def get(self, execution_id: str) -> dict[str, Any] | None:
        key = self._keys.workflow(execution_id)
        state: dict[str, Any] | None = self._decoded(key, await self._store.get(key))
        return state

    async def active(self) -> list[str]:
        """The ids in the active set, sorted."""
        return await self._store.members(self._keys.active)

    async def active_detailed(self) -> list[dict[str, Any]]:
        """The readable states of the ids in the active set."""
        snapshot = await self._store.workflow_snapshot(None)
        states = [_decoded(raw) for _, raw in snapshot.active if raw is not None]
        return [state for state in states if state is not None]

    async def stats(self) -> WorkflowStats:
        now = now_ms(self._clock)
        snapshot = await self._store.workflow_snapshot(now - MAX_RETENTION_MS)
        by_status = dict.fromkeys(WorkflowStatus, 0)
        seen: set[str] = set()
        progress: list[float] = []
        existing = 0
        for execution_id, raw in snapshot.active:
            if raw is None:
                continue  # the id outlived its state: cleanup will remove it
            existing += 1
            state = _decoded(raw)
            status = _status(state)
            if state is not None and status is not None:
                seen.add(execution_id)
                by_status[status] += 1
                progress.append(_percent(state.get("progress")))
        for raw in snapshot.finished:
            state = _decoded(raw)
            status = _status(state)
            if state is None or status is None:
                continue
            finished_id = state.get("executionId")
            if isinstance(finished_id, str):
                if finished_id in seen:
                    continue
                seen.add(finished_id)
            by_status[status] += 1
        # Math.round(total / count), as the seed averages.
        average = js_round(sum(progress) / len(progress)) if progress else 0
        return WorkflowStats(existing, by_status, average or 0)

    async def cleanup(self) -> Cleanup:
        """Prune the active set and fail stale runs; counts of each outcome."""
        now = now_ms(self._clock)
        snapshot = await self._store.workflow_snapshot(None)
        cleaned = errors = 0
        for execution_id, raw in snapshot.active:
            try:
                swap = self._cleanup_swap(execution_id, raw, now)
                if swap is None:
                    continue
                self._forget(execution_id)
                news = None
                if swap.new is not None and self._feed is not None:  # a stale run, now failed
                    event, news = self._feed.prepare("stale", decode(swap.new))
                    swap = replace(swap, event=event)
                if await self._store.swap_workflow(swap):
                    cleaned += 1
                    if news is not None and self._feed is not None:
                        self._feed.deliver(news)
            except WksError:
                errors += 1
        return Cleanup(cleaned, errors)

    # -- internals -----------------------------------------------------------
    def _cleanup_swap(self, execution_id: str, raw: bytes | None, now: int) -> WorkflowSwap | None:
        if raw is None:  # the state expired or was deleted: leave the set
            return WorkflowSwap(execution_id, None, None, None, active=False)
        state = decode(raw)
        if not isinstance(state, dict):
            raise InternalError(f"the state of workflow {execution_id} is not a map")
        if _is_finished(state):
            finished_at = _ms(state.get("completedAt")) or _ms(state.get("updatedAt")) or now
            return WorkflowSwap(
                execution_id,
                raw,
                None,
                None,
                active=False,
                finished_at=finished_at,
                retain_since=now - MAX_RETENTION_MS,
                updated_at=_ms(state.get("updatedAt")) or 0,
                finished=True,
            )
        updated = _ms(state.get("updatedAt"))
        if updated is None:
            updated = _ms(state.get("startedAt")) or 0  # no time at all: stale
        if now - updated <= self.stale_after_ms:
            return None
        state = dict(state)
        state.pop("estimatedCompletion", None)
        state.update(
            status=WorkflowStatus.FAILED, error=STALE_ERROR, updatedAt=now, completedAt=now
        )
        return WorkflowSwap(
            execution_id,
            raw,
            encode(state, "state", MAX_STATE_BYTES),
            RETENTION_MS[WorkflowStatus.FAILED],
            active=False,
            finished_at=now,
            retain_since=now - MAX_RETENTION_MS,
            updated_at=now,
            finished=True,
        )

    def _remember(self, execution_id: str, raw: bytes, state: dict[str, Any]) -> None:
        self._forget(execution_id)
        if len(raw) > MAX_KNOWN_STATE_BYTES:
            return
        self._known[execution_id] = (raw, state)
        self._known_bytes += len(raw)
        while self._known_bytes > MAX_KNOWN_BYTES:
            _, (dropped, _) = self._known.popitem(last=False)
            self._known_bytes -= len(dropped)

    def _forget(self, execution_id: str) -> None:
        known = self._known.pop(execution_id, None)
        if known is not None:
            self._known_bytes -= len(known[0])

    @staticmethod
    def _existing(execution_id: str, current: _Current) -> dict[str, Any]:
        if current is None:
            raise NotFound(f"no workflow {execution_id}")
        if not isinstance(current, dict):
            raise Conflict(
                f"the stored state of workflow {execution_id} is not a map;"
                " start it again to replace it"
            )
        if _is_finished(current):
            raise Conflict(f"workflow {execution_id} is already {current['status']}")
        return current

    async def _change(
        self,
        execution_id: str,
        plan: Callable[[_Current, int], _Plan],
        kind: Callable[[dict[str, Any]], str],
    ) -> dict[str, Any]:
        """Read, ``plan``, swap; again after a lost compare-and-set.

        The first attempt takes the state this daemon wrote last, if it
        knows it (``_known``), instead of reading it: when no one else wrote
        since, that is what the store holds, and the change costs the swap
        alone (one round trip to Redis). When someone did, the swap is lost
        and the next attempt reads; so does a plan that fails on what may be
        old news, before its error is believed.
        """
        key = self._keys.workflow(execution_id)
        known = self._known.get(execution_id)
        losses = 0
        while True:
            now = now_ms(self._clock)
            raw: bytes | None
            if known is not None:
                raw, current = known
                try:
                    decision = plan(current, now)
                except WksError:
                    known = None
                    continue
            else:
                raw = await self._store.get(key)
                decision = plan(_read_state(raw), now)
            new = encode(decision.state, "state", MAX_STATE_BYTES)
            event = news = None
            if self._feed is not None:
                event, news = self._feed.prepare(kind(decision.state), decision.state)
            swap = WorkflowSwap(
                execution_id,
                expected=raw,
                new=new,
                ttl_ms=decision.ttl_ms,
                active=decision.active,
                finished_at=decision.finished_at,
                retain_since=now - MAX_RETENTION_MS,
                updated_at=_ms(decision.state.get("updatedAt")) or 0,
                finished=_is_finished(decision.state),
                event=event,
            )
            if await self._store.swap_workflow(swap):
                if decision.active:
                    self._remember(execution_id, new, decision.state)
                else:
                    self._forget(execution_id)
                if self._feed is not None:
                    self._feed.deliver(news)
                return decision.state
            if known is not None:  # someone else wrote since: not a collision of ours
                self._forget(execution_id)
                known = None
                continue
            losses += 1
            if losses == MAX_SWAP_ATTEMPTS:
                raise Conflict(f"workflow {execution_id} kept changing under us; try again")
            cap = min(SWAP_BACKOFF_CAP, SWAP_BACKOFF_BASE * 2 ** (losses - 1))
            await self._sleep(random.uniform(0, cap))


def _encode_checked(data: dict[str, Any]) -> dict[str, Any]:
    """``data``, once it is known to obey the value limit (merged data grows)."""
    encode(data, "data")
    return data


def _percent(value: Any) -> float:
    """A stored progress for the average: a number, or 0 (JavaScript's null)."""
    number = _number(value)
    return 0.0 if number is None else float(number)


def _decoded(raw: bytes | None) -> dict[str, Any] | None:
    """A stored state for reporting; None when absent or unreadable."""
    if raw is None:
        return None
    try:
        state = decode(raw)
    except WksError:
        return None
    return state if isinstance(state, dict) else None
