"""The memory store's own rules: expiry, sweeping, the key bound (wksd.store.memory)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from clientlib.errors import Full
from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.store.base import WorkflowSwap, WrongType
from wksd.store.memory import MemoryStore

KEYS = KeySpace("wks:")


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def store(clock: ManualClock) -> MemoryStore:
    return MemoryStore(clock=clock)


async def test_expired_key_is_invisible_at_once(store: MemoryStore, clock: ManualClock) -> None:
    """A key past its TTL reads as missing, before any sweep runs."""
    await store.set("k", b"v", 1000)
    clock.advance(0.999)
    assert await store.get("k") == b"v"
    clock.advance(0.001)
    assert await store.get("k") is None
    assert not await store.delete("k")
    assert not await store.expire("k", 1000)
    assert len(store) == 0


async def test_ttl_is_reported_in_remaining_ms(store: MemoryStore, clock: ManualClock) -> None:
    """get_with_ttl reports the ms left, and None for a key without TTL."""
    await store.set("k", b"v", 5000)
    clock.advance(1.5)
    assert await store.get_with_ttl("k") == (b"v", 3500)
    await store.set("p", b"v", None)
    assert await store.get_with_ttl("p") == (b"v", None)
    assert await store.get_with_ttl("missing") == (None, None)


async def test_set_without_ttl_clears_an_old_ttl(store: MemoryStore, clock: ManualClock) -> None:
    """Overwriting with no TTL makes the key persistent, as Redis SET does."""
    await store.set("k", b"1", 1000)
    await store.set("k", b"2", None)
    clock.advance(10)
    assert await store.get("k") == b"2"


async def test_expire_resets_the_deadline(store: MemoryStore, clock: ManualClock) -> None:
    """expire moves the deadline both later and earlier."""
    await store.set("k", b"v", 1000)
    assert await store.expire("k", 5000)
    clock.advance(2)
    assert await store.get("k") == b"v"
    assert await store.expire("k", 10)
    clock.advance(0.01)
    assert await store.get("k") is None


async def test_sweep_frees_expired_keys_nobody_reads(
    store: MemoryStore, clock: ManualClock
) -> None:
    """The sweeper removes expired keys from memory and leaves live ones."""
    for index in range(100):
        await store.set(f"short{index}", b"v", 1000)
        await store.set(f"long{index}", b"v", 100_000)
    clock.advance(1)
    assert len(store) == 200
    assert await store.sweep() == 100
    assert len(store) == 100
    assert store.expired == 100


async def test_sweep_yields_between_slices(store: MemoryStore, clock: ManualClock) -> None:
    """A large sweep checkpoints after every slice instead of holding the loop."""
    for index in range(2500):
        await store.set(f"k{index}", b"v", 10)
    clock.advance(1)
    seen: list[int] = []

    async def watch() -> None:
        while len(store):
            seen.append(len(store))
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.sweep, 1000)
        nursery.start_soon(watch)
    # Another task ran while the sweep was part-way: it saw some, not all, freed.
    assert any(0 < size < 2500 for size in seen)
    assert len(store) == 0


def test_sweep_some_stops_at_its_limit(store: MemoryStore, clock: ManualClock) -> None:
    """One slice frees at most its limit and says more are due."""
    for index in range(30):
        trio.run(store.set, f"k{index}", b"v", 10)
    clock.advance(1)
    assert store.sweep_some(10) == (10, True)
    assert store.sweep_some(100) == (20, False)


async def test_heap_does_not_grow_with_repeated_touches(
    store: MemoryStore, clock: ManualClock
) -> None:
    """Extending one key's TTL many times keeps a single scheduled entry."""
    await store.set("hot", b"v", 1000)
    for _ in range(10_000):
        clock.advance(0.01)
        await store.expire("hot", 1000)
    assert len(store._heap) == 1
    clock.advance(5)
    assert await store.sweep() == 1


async def test_sweep_keeps_a_key_whose_ttl_was_extended(
    store: MemoryStore, clock: ManualClock
) -> None:
    """An entry that comes due for a key since extended is rescheduled, not freed."""
    await store.set("k", b"v", 1000)
    await store.expire("k", 5000)
    clock.advance(2)
    assert await store.sweep() == 0
    assert await store.get("k") == b"v"
    clock.advance(4)
    assert await store.sweep() == 1


async def test_deleted_then_recreated_key_is_swept_on_its_new_deadline(
    store: MemoryStore, clock: ManualClock
) -> None:
    """An old heap entry of a deleted key never removes its successor early."""
    await store.set("k", b"old", 1000)
    await store.delete("k")
    await store.set("k", b"new", 3000)
    clock.advance(1.5)
    await store.sweep()
    assert await store.get("k") == b"new"


async def test_full_store_evicts_cache_entries_first(clock: ManualClock) -> None:
    """At the bound, the oldest API-cache entry makes room; nothing else is dropped."""
    store = MemoryStore(clock=clock, max_keys=3, evictable=lambda key: key.startswith("c:"))
    await store.set("c:1", b"v", None)
    await store.set("s:1", b"v", None)
    await store.set("c:2", b"v", None)
    await store.set("s:2", b"v", None)
    assert await store.get("c:1") is None
    assert await store.get("c:2") == b"v"
    assert store.evicted == 1
    await store.set("s:3", b"v", None)
    assert await store.get("c:2") is None
    with pytest.raises(Full):
        await store.set("s:4", b"v", None)
    assert [await store.get(key) for key in ("s:1", "s:2", "s:3")] == [b"v"] * 3


async def test_rewriting_a_cache_entry_makes_it_youngest(clock: ManualClock) -> None:
    """Eviction order follows the last write, so a hot entry survives."""
    store = MemoryStore(clock=clock, max_keys=2, evictable=lambda key: key.startswith("c:"))
    await store.set("c:1", b"v", None)
    await store.set("c:2", b"v", None)
    await store.set("c:1", b"v2", None)
    await store.set("c:3", b"v", None)
    assert await store.get("c:1") == b"v2"
    assert await store.get("c:2") is None


async def test_full_store_frees_expired_keys_before_evicting(clock: ManualClock) -> None:
    """Expired keys make room first, before any live cache entry goes."""
    store = MemoryStore(clock=clock, max_keys=2, evictable=lambda key: key.startswith("c:"))
    await store.set("c:1", b"v", None)
    await store.set("s:1", b"v", 10)
    clock.advance(1)
    await store.set("s:2", b"v", None)
    assert await store.get("c:1") == b"v"
    assert store.evicted == 0


async def test_overwriting_needs_no_room(clock: ManualClock) -> None:
    """A full store still accepts writes to keys it already holds."""
    store = MemoryStore(clock=clock, max_keys=1)
    await store.set("k", b"1", None)
    await store.set("k", b"2", None)
    assert await store.get("k") == b"2"


async def test_full_never_leaves_half_a_lock(clock: ManualClock) -> None:
    """A lock acquire that cannot get room for all its keys changes nothing."""
    store = MemoryStore(clock=clock, max_keys=2)
    await store.set("other", b"v", None)
    with pytest.raises(Full):
        await store.lock_acquire("e1", "w1", 1000)
    assert await store.get(KEYS.lock("e1")) is None
    assert len(store) == 1


async def test_full_never_leaves_half_a_workflow_swap(clock: ManualClock) -> None:
    """A workflow start that cannot get room leaves neither state nor set entry."""
    store = MemoryStore(clock=clock, max_keys=1)
    await store.set("other", b"v", None)
    swap = WorkflowSwap("e1", None, b"{}", 1000, active=True)
    with pytest.raises(Full):
        await store.swap_workflow(swap)
    assert await store.members(KEYS.active) == []
    assert await store.get(KEYS.workflow("e1")) is None


async def test_emptied_set_is_removed(store: MemoryStore) -> None:
    """Like Redis, a set whose last member leaves no longer counts as a key."""
    await store.swap_workflow(WorkflowSwap("e1", None, b"{}", None, active=True))
    assert len(store) == 2
    await store.swap_workflow(WorkflowSwap("e1", b"{}", None, None, active=False))
    assert await store.members(KEYS.active) == []
    assert len(store) == 1


async def test_wrong_type_is_an_internal_error(store: MemoryStore) -> None:
    """Reading a set as a string is refused, not misread."""
    await store.swap_workflow(WorkflowSwap("e1", None, b"{}", None, active=True))
    with pytest.raises(WrongType):
        await store.get(KEYS.active)


async def test_sweeper_task_runs_every_interval(autojump_clock: trio.testing.MockClock) -> None:
    """The daemon's sweeper frees expired keys once per WKSD_SWEEP_INTERVAL."""
    from wksd.app import Daemon
    from wksd.config import Config

    clock, interval = ManualClock(), 60
    daemon = Daemon(Config(sweep_interval=interval), clock=clock)
    await daemon.memory.set("k", b"v", 1000)
    clock.advance(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(daemon._sweep_forever)
        await trio.sleep(interval - 1)  # virtual time: just before the first sweep
        assert len(daemon.memory) == 1
        await trio.sleep(2)  # virtual time: just after it
        assert len(daemon.memory) == 0
        nursery.cancel_scope.cancel()
    assert "wksd_sweeper_evictions_total 1.0" in daemon.metrics.render()


async def test_event_histories_stay_within_their_budgets(
    store: MemoryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the byte budget or the counts, the oldest events and quietest executions go."""
    import wksd.store.memory as memory

    monkeypatch.setattr(memory, "EVENT_BYTES_BUDGET", 10_000)
    event = b"x" * 1000
    for index in range(30):
        store.record_event(f"e{index % 3}", event, index, 60_000)
    assert store._log_bytes <= 10_000 and store._all_bytes <= 10_000
    assert len(await store.read_events(None, -1, 100)) == 10
    assert len(await store.read_events("e2", -1, 100)) > 0  # the latest execution stays
    for index in range(2000):
        store.record_event("chatty", b"y", 100 + index, 60_000)
    assert len(await store.read_events("chatty", -1, 5000)) == memory.EVENTS_PER_EXECUTION


async def test_composite_steps_name_their_keys_in_the_stores_key_space(clock: ManualClock) -> None:
    """A memory store built for another prefix puts every key of its composite steps under it."""
    store = MemoryStore(keys=KeySpace("other:"), clock=clock)
    assert (await store.lock_acquire("e1", "w1", 1000)).acquired
    assert await store.swap_workflow(WorkflowSwap("e1", None, b"{}", None, active=True))
    await store.cache_fill("k", b"1", 1000, b"meta")
    assert await store.get("other:lock:execution:e1") == b"w1"
    assert await store.get("other:lock:token:e1") == b"1:w1"
    assert await store.members("other:executions:active") == ["e1"]
    assert await store.cache_lookup("k") == (b"1", b"meta")
    assert await store.get("other:cache:meta:k") == b"meta"
    assert await store.get_many(["wks:lock:execution:e1", "wks:workflow:e1"]) == [None, None]
