"""The memory bound counts what may go (issue: outage writes and locks are kept)."""

from __future__ import annotations

import pytest

from clientlib.errors import Full
from wksd.clock import ManualClock
from wksd.keys import KeySpace
from wksd.store.base import WorkflowSwap
from wksd.store.memory import MemoryStore

KEYS = KeySpace("wks:")


def bounded(clock: ManualClock, max_keys: int, *, keep_writes: bool = False) -> MemoryStore:
    """A store laid out as the daemon lays it out: cache evictable, locks protected."""
    return MemoryStore(
        clock=clock,
        max_keys=max_keys,
        evictable=lambda key: key.startswith(KEYS.cache_prefix),
        protected=lambda key: key.startswith(KEYS.lock_prefix),
        keep_writes=keep_writes,
    )


@pytest.mark.parametrize("expired", [1, 5, 50])
async def test_reserve_when_the_sweep_frees_more_than_needed(
    clock: ManualClock, expired: int
) -> None:
    """Many expired keys freed by one sweep leave a negative need: no error, no eviction."""
    store = bounded(clock, expired + 1)
    for index in range(expired):
        await store.set(f"wks:session:old{index}", b"{}", 1_000)
    await store.set(KEYS.cache("c"), b"1", None)
    clock.advance(2)
    for index in range(expired):
        await store.set(f"wks:session:new{index}", b"{}", None)
    assert store.evicted == 0
    assert await store.get(KEYS.cache("c")) == b"1"


async def test_cache_entries_go_first_then_clean_copies(clock: ManualClock) -> None:
    """The eviction order: API-cache entries, then the mirror's clean copies."""
    store = bounded(clock, 3, keep_writes=True)
    store.mirror_set(KEYS.session("clean"), b"{}", None)
    store.mirror_set(KEYS.cache("copy"), b"1", None)
    await store.set(KEYS.session("outage"), b"{}", None)
    await store.set(KEYS.session("second"), b"{}", None)
    assert await store.get(KEYS.cache("copy")) is None
    assert await store.get(KEYS.session("clean")) == b"{}"
    await store.set(KEYS.session("third"), b"{}", None)
    assert await store.get(KEYS.session("clean")) is None
    assert store.evicted == 2


async def test_outage_writes_are_never_evicted(clock: ManualClock) -> None:
    """Behind the failover, a write made in memory (a cache entry too) is the only
    copy: the store answers FULL rather than drop one."""
    store = bounded(clock, 2, keep_writes=True)
    await store.set(KEYS.cache("outage"), b"1", None)
    await store.set(KEYS.session("outage"), b"{}", None)
    with pytest.raises(Full):
        await store.set(KEYS.session("more"), b"{}", None)
    assert await store.get(KEYS.cache("outage")) == b"1"
    assert await store.get(KEYS.session("outage")) == b"{}"


async def test_embedded_default_still_evicts_cache_entries(clock: ManualClock) -> None:
    """Without Redis the API cache is a cache: its entries make room (DESIGN 5)."""
    store = bounded(clock, 1)
    await store.set(KEYS.cache("c"), b"1", None)
    await store.set(KEYS.session("s"), b"{}", None)
    assert await store.get(KEYS.cache("c")) is None


async def test_lock_copies_are_never_evicted(clock: ManualClock) -> None:
    """A full mirror keeps every lock it was told of, even past the bound, so no
    second worker of this host is granted it during an outage."""
    store = bounded(clock, 2, keep_writes=True)
    store.mirror_set(KEYS.session("a"), b"{}", None)
    store.mirror_set(KEYS.session("b"), b"{}", None)
    store.mirror_lock("e1", "w1", 7, 30_000)
    for index in range(10):
        store.mirror_set(KEYS.session(f"n{index}"), b"{}", None)
    outcome = await store.lock_acquire("e1", "w2", 30_000)
    assert not outcome.acquired and outcome.holder == "w1"
    assert await store.get(KEYS.fencing) == b"7"
    token = await store.lock_acquire("e1", "w1", 30_000)
    assert token.token == 7


async def test_a_mirror_that_finds_no_room_drops_the_stale_copy(clock: ManualClock) -> None:
    """Better no copy than an old one: a skipped mirror of a new key leaves nothing behind."""
    store = bounded(clock, 1, keep_writes=True)
    await store.set(KEYS.session("outage"), b"{}", None)
    store.mirror_set(KEYS.session("new"), b"{}", None)
    assert await store.get(KEYS.session("new")) is None
    store.mirror_workflow(WorkflowSwap("e1", None, b"{}", None, active=True))
    assert await store.get(KEYS.workflow("e1")) is None
