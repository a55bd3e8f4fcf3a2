"""Workflow tracking, on every backend (wksd.domain.workflows)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clientlib.errors import BadRequest, Conflict, NotFound
from wksd.domain import Cleanup, Workflows, WorkflowStats, WorkflowStatus
from wksd.domain.workflows import (
    MAX_KNOWN_BYTES,
    MAX_KNOWN_STATE_BYTES,
    STALE_ERROR,
    SWAP_BACKOFF_BASE,
)
from wksd.store.base import Store, WorkflowSnapshot, WorkflowSwap

from .conftest import Domain


async def test_start_creates_a_running_state_in_the_active_set(domain: Domain) -> None:
    """start: running, progress 0, step "initializing", the seed's fields, in the active set."""
    now = int(domain.clock.time() * 1000)
    state = await domain.workflows.start("e1", "w1", 5, {"userId": "u1"})
    assert state == {
        "executionId": "e1",
        "workflowId": "w1",
        "status": "running",
        "progress": 0,
        "currentStep": "initializing",
        "totalSteps": 5,
        "completedSteps": 0,
        "data": {"userId": "u1"},
        "startedAt": now,
        "updatedAt": now,
    }
    assert await domain.workflows.get("e1") == state
    assert json.loads(await domain.store.get("wks:workflow:e1") or b"") == state
    assert await domain.store.members("wks:executions:active") == ["e1"]


async def test_running_state_outlives_the_stale_threshold(domain: Domain) -> None:
    """A running state's TTL is longer than WKSD_WORKFLOW_STALE_AFTER (3600 s here)."""
    await domain.workflows.start("e1", "w1", 5, {})
    _, ttl = await domain.store.get_with_ttl("wks:workflow:e1")
    assert ttl is not None and ttl > 3600 * 1000


async def test_starting_an_active_execution_conflicts(domain: Domain) -> None:
    """A second start of a running id is CONFLICT and changes nothing."""
    first = await domain.workflows.start("e1", "w1", 5, {})
    with pytest.raises(Conflict):
        await domain.workflows.start("e1", "w2", 9, {})
    assert await domain.workflows.get("e1") == first


async def test_restarting_a_finished_execution_replaces_it(domain: Domain) -> None:
    """Starting an id that finished starts it afresh, back in the active set."""
    await domain.workflows.start("e1", "w1", 2, {"old": True})
    await domain.workflows.complete("e1", "failed", "boom", None)
    domain.clock.advance(1)
    state = await domain.workflows.start("e1", "w1", 3, {})
    assert state["status"] == "running" and state["data"] == {} and "error" not in state
    assert await domain.store.members("wks:executions:active") == ["e1"]
    stats = await domain.workflows.stats()
    assert stats.by_status[WorkflowStatus.FAILED] == 0


@pytest.mark.parametrize(
    ("completed", "total", "progress"),
    [(0, 5, 0), (1, 8, 13), (1, 3, 33), (2, 3, 67), (1, 200, 1), (1, 400, 0), (5, 5, 100)],
)
async def test_progress_rounds_half_up(
    domain: Domain, completed: int, total: int, progress: int
) -> None:
    """progress = round(100 * completed / total), halves up as Math.round does."""
    await domain.workflows.start("e1", "w1", total, {})
    state = await domain.workflows.update("e1", completed, "step", None)
    assert state["progress"] == progress


async def test_eta_comes_from_the_exact_fraction(domain: Domain) -> None:
    """estimatedCompletion = startedAt + elapsed / fraction, exact for 1/3."""
    started = (await domain.workflows.start("e1", "w1", 3, {}))["startedAt"]
    domain.clock.advance(10)
    state = await domain.workflows.update("e1", 1, "one third", None)
    assert state["estimatedCompletion"] == started + 30_000
    domain.clock.advance(10)
    state = await domain.workflows.update("e1", 2, "two thirds", None)
    assert state["estimatedCompletion"] == started + 30_000


async def test_eta_is_absent_at_zero_and_at_the_end(domain: Domain) -> None:
    """With fraction 0 or 1 there is no estimate, and an old one is dropped."""
    await domain.workflows.start("e1", "w1", 2, {})
    domain.clock.advance(5)
    assert "estimatedCompletion" in await domain.workflows.update("e1", 1, "half", None)
    assert "estimatedCompletion" not in await domain.workflows.update("e1", 0, "back", None)
    await domain.workflows.update("e1", 1, "half", None)
    assert "estimatedCompletion" not in await domain.workflows.update("e1", 2, "all", None)


async def test_update_merges_data_shallowly(domain: Domain) -> None:
    """Update data is merged key by key; nil data leaves it as it was."""
    await domain.workflows.start("e1", "w1", 4, {"a": 1, "nested": {"x": 1}})
    await domain.workflows.update("e1", 1, "s1", {"b": 2, "nested": {"y": 2}})
    state = await domain.workflows.update("e1", 2, "s2", None)
    assert state["data"] == {"a": 1, "b": 2, "nested": {"y": 2}}
    assert state["currentStep"] == "s2" and state["completedSteps"] == 2


@pytest.mark.parametrize("completed", [-1, 6])
async def test_update_out_of_range_is_a_bad_request(domain: Domain, completed: int) -> None:
    """completed_steps outside 0..totalSteps is BAD_REQUEST and changes nothing."""
    before = await domain.workflows.start("e1", "w1", 5, {})
    with pytest.raises(BadRequest, match="between 0 and 5"):
        await domain.workflows.update("e1", completed, "x", None)
    assert await domain.workflows.get("e1") == before


async def test_update_of_unknown_execution_is_not_found(domain: Domain) -> None:
    """Updating or completing an id that was never started is NOT_FOUND."""
    with pytest.raises(NotFound):
        await domain.workflows.update("nope", 1, "x", None)
    with pytest.raises(NotFound):
        await domain.workflows.complete("nope", "completed", None, None)


async def test_finished_workflows_refuse_updates_and_completion(domain: Domain) -> None:
    """Updating or completing a finished workflow is CONFLICT."""
    await domain.workflows.start("e1", "w1", 5, {})
    await domain.workflows.complete("e1", "cancelled", None, None)
    with pytest.raises(Conflict):
        await domain.workflows.update("e1", 1, "x", None)
    with pytest.raises(Conflict):
        await domain.workflows.complete("e1", "completed", None, None)


async def test_complete_sets_the_final_fields(domain: Domain) -> None:
    """completed: progress 100, completedAt, merged final data, no ETA, out of the active set."""
    await domain.workflows.start("e1", "w1", 4, {"a": 1})
    domain.clock.advance(3)
    await domain.workflows.update("e1", 1, "s1", None)
    domain.clock.advance(3)
    now = int(domain.clock.time() * 1000)
    state = await domain.workflows.complete("e1", "completed", None, {"total": 500})
    assert state["status"] == "completed" and state["progress"] == 100
    assert state["completedAt"] == state["updatedAt"] == now
    assert state["data"] == {"a": 1, "total": 500}
    assert "estimatedCompletion" not in state and "error" not in state
    assert await domain.store.members("wks:executions:active") == []


@pytest.mark.parametrize(
    ("status", "retention"), [("completed", 7200), ("failed", 3600), ("cancelled", 3600)]
)
async def test_finished_states_keep_their_retention(
    domain: Domain, status: str, retention: int
) -> None:
    """The state's TTL after complete is the seed's: 7200 s completed, 3600 s otherwise."""
    await domain.workflows.start("e1", "w1", 4, {})
    await domain.workflows.update("e1", 1, "s1", None)
    state = await domain.workflows.complete(
        "e1", status, "why" if status != "completed" else None, None
    )
    _, ttl = await domain.store.get_with_ttl("wks:workflow:e1")
    assert ttl is not None and (retention - 1) * 1000 < ttl <= retention * 1000
    assert state["progress"] == (100 if status == "completed" else 25)
    assert state.get("error") == (None if status == "completed" else "why")


async def test_active_lists_running_ids(domain: Domain) -> None:
    """active gives the ids and count; detailed gives their states."""
    for execution_id in ("b", "a", "c"):
        await domain.workflows.start(execution_id, "w", 2, {})
    await domain.workflows.complete("c", "completed", None, None)
    assert await domain.workflows.active() == ["a", "b"]
    detailed = await domain.workflows.active_detailed()
    assert sorted(state["executionId"] for state in detailed) == ["a", "b"]


async def test_stats_count_active_and_recently_finished(domain: Domain) -> None:
    """stats: active by status, finished ones still retained, average progress of the active."""
    for execution_id in ("r1", "r2", "c1", "f1", "x1"):
        await domain.workflows.start(execution_id, "w", 4, {})
    await domain.workflows.update("r1", 1, "s", None)  # 25
    await domain.workflows.update("r2", 2, "s", None)  # 50
    await domain.workflows.complete("c1", "completed", None, None)
    await domain.workflows.complete("f1", "failed", "e", None)
    await domain.workflows.complete("x1", "cancelled", None, None)
    stats = await domain.workflows.stats()
    assert stats == WorkflowStats(
        active_executions=2,
        by_status={
            WorkflowStatus.PENDING: 0,
            WorkflowStatus.RUNNING: 2,
            WorkflowStatus.COMPLETED: 1,
            WorkflowStatus.FAILED: 1,
            WorkflowStatus.CANCELLED: 1,
        },
        average_progress=38,  # (25 + 50) / 2 = 37.5, half up
    )


async def test_stats_read_everything_in_one_snapshot(domain: Domain) -> None:
    """stats makes one store call for the lot, however many executions (no N+1)."""
    for index in range(20):
        await domain.workflows.start(f"e{index}", "w", 2, {})
    counting = CountingStore(domain.store)
    domain.workflows._store = counting
    await domain.workflows.stats()
    assert counting.calls == ["workflow_snapshot"]


async def test_cleanup_prunes_and_fails_stale_runs(domain: Domain) -> None:
    """cleanup: gone ids leave the set, finished ones leave it, stale runs become failed."""
    await domain.workflows.start("stale", "w", 4, {})
    await domain.workflows.start("gone", "w", 4, {})
    await domain.workflows.start("done", "w", 4, {})
    await domain.store.delete("wks:workflow:gone")
    # A finished state still in the set, as a crash between writes could leave it.
    done = await domain.workflows.complete("done", "completed", None, None)
    await domain.store.swap_workflow(
        WorkflowSwap(
            "done", json.dumps(done, separators=(",", ":")).encode(), None, None, active=True
        ),
    )
    domain.clock.advance(3000)
    await domain.workflows.start("fresh", "w", 4, {})
    domain.clock.advance(601)  # "stale" is now 3601 s old; "fresh" 601 s
    assert await domain.workflows.cleanup() == Cleanup(cleaned=3, errors=0)
    assert await domain.workflows.active() == ["fresh"]
    stale = await domain.workflows.get("stale")
    assert stale is not None
    assert stale["status"] == "failed" and stale["error"] == STALE_ERROR
    assert "completedAt" in stale and "estimatedCompletion" not in stale
    stats = await domain.workflows.stats()
    assert stats.by_status[WorkflowStatus.FAILED] == 1


async def test_cleanup_counts_unreadable_states_as_errors(domain: Domain) -> None:
    """A state that is not JSON is counted as an error and left for a person to see."""
    await domain.workflows.start("bad", "w", 4, {})
    await domain.store.set("wks:workflow:bad", b"{not json", None)
    assert await domain.workflows.cleanup() == Cleanup(cleaned=0, errors=1)


async def test_a_concurrent_update_is_never_lost(domain: Domain) -> None:
    """When another writer changes the state between read and write, the update retries."""
    await domain.workflows.start("e1", "w1", 10, {})
    other = Domain(domain.store, domain.keys, domain.clock)
    racing = InterleavingStore(
        domain.store, lambda: other.workflows.update("e1", 3, "other", {"theirs": 1})
    )
    domain.workflows._store = racing
    state = await domain.workflows.update("e1", 4, "mine", {"mine": 1})
    assert racing.swaps_refused == 1
    assert state["data"] == {"theirs": 1, "mine": 1}
    assert await domain.workflows.get("e1") == state


async def test_a_lost_swap_waits_with_the_sleep_it_was_given(domain: Domain) -> None:
    """After a lost compare-and-set, the retry waits through the injected sleep, briefly."""
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    workflows = Workflows(domain.store, domain.keys, domain.clock, stale_after=3600, sleep=sleep)
    other = Domain(domain.store, domain.keys, domain.clock)
    await other.workflows.start("e1", "w1", 10, {})  # so ``workflows`` reads it
    workflows._store = InterleavingStore(
        domain.store, lambda: other.workflows.update("e1", 3, "other", None)
    )
    await workflows.update("e1", 4, "mine", None)
    assert len(pauses) == 1 and 0 <= pauses[0] <= SWAP_BACKOFF_BASE


async def test_a_change_after_our_own_write_swaps_without_reading(domain: Domain) -> None:
    """The state this daemon wrote last is the compare-and-set's expectation:
    the change costs the swap alone."""
    counting = CountingStore(domain.store)
    domain.workflows._store = counting
    await domain.workflows.start("e1", "w1", 10, {"a": 1})
    reads = counting.calls.count("get")
    for step in range(1, 5):
        await domain.workflows.update("e1", step, f"s{step}", {"b": step})
    state = await domain.workflows.complete("e1", WorkflowStatus.COMPLETED, None, None)
    assert counting.calls.count("get") == reads  # five changes, no read
    assert state["data"] == {"a": 1, "b": 4} and state["progress"] == 100
    assert await domain.workflows.get("e1") == state


async def test_a_change_known_here_but_old_news_is_read_again_at_once(domain: Domain) -> None:
    """Another daemon wrote since our last write: the swap on our copy is lost,
    the retry reads, without the collision's wait, and keeps their change."""
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    workflows = Workflows(domain.store, domain.keys, domain.clock, stale_after=3600, sleep=sleep)
    other = Domain(domain.store, domain.keys, domain.clock)
    await workflows.start("e1", "w1", 10, {})
    await other.workflows.update("e1", 3, "other", {"theirs": 1})
    state = await workflows.update("e1", 4, "mine", {"mine": 1})
    assert pauses == []
    assert state["data"] == {"theirs": 1, "mine": 1}
    assert await workflows.get("e1") == state


async def test_an_error_judged_on_a_copy_is_read_again_before_it_is_believed(
    domain: Domain,
) -> None:
    """Our copy says 4 steps; another daemon finished the run and started it again
    with 10. Step 8 is judged on what the store holds, not refused on the copy."""
    other = Domain(domain.store, domain.keys, domain.clock)
    await domain.workflows.start("e1", "w1", 4, {})
    await other.workflows.complete("e1", WorkflowStatus.COMPLETED, None, None)
    await other.workflows.start("e1", "w1", 10, {})
    state = await domain.workflows.update("e1", 8, "late", None)
    assert state["totalSteps"] == 10 and state["completedSteps"] == 8
    with pytest.raises(BadRequest):  # and a real error is still one
        await domain.workflows.update("e1", 11, "too far", None)


async def test_the_copies_of_our_own_writes_are_bounded(domain: Domain) -> None:
    """At most MAX_KNOWN_BYTES of states are kept, the least recently written
    out first, and none over MAX_KNOWN_STATE_BYTES; the rest are read."""
    data = {"pad": "x" * 4000}
    count = MAX_KNOWN_BYTES // 4000 + 10
    for index in range(count):
        await domain.workflows.start(f"e{index}", "w", 10, data)
    known = domain.workflows._known
    assert domain.workflows._known_bytes <= MAX_KNOWN_BYTES
    assert "e0" not in known and f"e{count - 1}" in known
    await domain.workflows.start("big", "w", 10, {"pad": "x" * MAX_KNOWN_STATE_BYTES})
    assert "big" not in known
    counting = CountingStore(domain.store)
    domain.workflows._store = counting
    await domain.workflows.update("e0", 1, "read", None)  # forgotten: read
    assert counting.calls.count("get") == 1


async def test_workflow_data_obeys_the_value_limit(domain: Domain) -> None:
    """Start and merged update data over 1 MiB are TOO_LARGE; 1 MiB itself fits."""
    from clientlib.errors import TooLarge
    from wksd.domain.values import MAX_VALUE_BYTES

    exact = {"x": "y" * (MAX_VALUE_BYTES - 8)}  # {"x":""} is 8 bytes
    await domain.workflows.start("e1", "w", 2, exact)
    with pytest.raises(TooLarge):
        await domain.workflows.update("e1", 1, "s", {"z": 1})
    with pytest.raises(TooLarge):
        await domain.workflows.start("e2", "w", 2, {"x": "y" * MAX_VALUE_BYTES})


class CountingStore:
    """A store that records which methods were called."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        self.calls.append(name)
        return getattr(self._inner, name)


class InterleavingStore:
    """Runs ``meddle`` once, just before the first swap, then refuses nothing itself."""

    def __init__(self, inner: Store, meddle: Any) -> None:
        self._inner = inner
        self._meddle = meddle
        self.swaps_refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def swap_workflow(self, swap: WorkflowSwap) -> bool:
        if self._meddle is not None:
            meddle, self._meddle = self._meddle, None
            await meddle()
        done = await self._inner.swap_workflow(swap)
        self.swaps_refused += not done
        return done

    async def workflow_snapshot(self, since: int | None) -> WorkflowSnapshot:
        return await self._inner.workflow_snapshot(since)
