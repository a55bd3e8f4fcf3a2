"""Waiting ``cache.lease`` calls: bounded per connection, and cheap for Redis.

The service runs on trio's MockClock over a memory store that counts its
lookups, so "how many looks a second" is a count, not a timing.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from clientlib.errors import Full
from wksd.coordination.singleflight import (
    MAX_LEASE_WAITS_PER_CONNECTION,
    REMOTE_POLL,
    LeaseAnswer,
    LeaseStatus,
    SingleFlight,
)
from wksd.keys import KeySpace
from wksd.session import Later
from wksd.store.memory import MemoryStore

from .test_coordination import FakeSession, TrioClock


class CountingStore(MemoryStore):
    """A memory store that counts ``cache_lookup`` calls, as Redis would count GETs."""

    lookups = 0

    async def cache_lookup(self, key: str) -> tuple[bytes | None, bytes | None]:
        self.lookups += 1
        return await super().cache_lookup(key)


def remote_flight() -> tuple[CountingStore, KeySpace, SingleFlight]:
    """A flight service whose key "k" another daemon is computing (its lease is in the store)."""
    clock, keys = TrioClock(), KeySpace("wks:")
    store = CountingStore(clock=clock)
    return store, keys, SingleFlight(store, keys, clock)


async def test_waiters_of_a_remote_flight_cost_one_lookup_per_poll(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """200 callers waiting for a value another daemon computes: the first looks for it
    every REMOTE_POLL and the others do not; all get the value once it appears."""
    store, keys, flights = remote_flight()
    assert await store.set_if_absent(keys.cache_lease("k"), b"theirs", 60_000)
    answers: list[Any] = []

    async def wait(later: Later) -> None:
        answers.append(await later.wait())

    async with trio.open_nursery() as nursery:
        for index in range(200):
            later = await flights.lease(FakeSession(index), "k", 30, 20)
            assert isinstance(later, Later)
            nursery.start_soon(wait, later)
        await trio.testing.wait_all_tasks_blocked()
        before = store.lookups
        await trio.sleep(10 * REMOTE_POLL)
        polls = store.lookups - before
        print(f"lookups in {10 * REMOTE_POLL:.1f} s with 200 waiters: {polls}")
        assert polls <= 11  # one waiter looks; with one per waiter it would be ~2000
        await store.set(keys.cache("k"), b'{"v":1}', 60_000)  # the other daemon fills it
    assert answers == [LeaseAnswer(LeaseStatus.HIT, {"v": 1})] * 200


async def test_the_next_waiter_looks_when_the_first_leaves(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The looking waiter times out; the one after it takes over the looking."""
    store, keys, flights = remote_flight()
    assert await store.set_if_absent(keys.cache_lease("k"), b"theirs", 60_000)
    short = await flights.lease(FakeSession(1), "k", 30, 1)
    long = await flights.lease(FakeSession(2), "k", 30, 30)
    assert isinstance(short, Later) and isinstance(long, Later)
    answers: dict[str, Any] = {}

    async def wait(name: str, later: Later) -> None:
        answers[name] = await later.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait, "short", short)
        nursery.start_soon(wait, "long", long)
        await trio.sleep(2)  # the first has timed out
        assert answers == {"short": LeaseAnswer(LeaseStatus.TIMEOUT)}
        before = store.lookups
        await trio.sleep(10 * REMOTE_POLL)
        assert store.lookups - before >= 5  # the second looks now
        await store.set(keys.cache("k"), b"2", 60_000)
    assert answers["long"] == LeaseAnswer(LeaseStatus.HIT, 2)


async def test_lease_waits_beyond_the_bound_are_refused(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """One connection's waiting leases stop at the bound with FULL; the refused call
    joins no flight, and a place frees when a wait ends."""
    store, keys, flights = remote_flight()
    session = FakeSession(1)
    laters = []
    for index in range(MAX_LEASE_WAITS_PER_CONNECTION):
        assert await store.set_if_absent(keys.cache_lease(f"k{index}"), b"theirs", 60_000)
        laters.append(await flights.lease(session, f"k{index}", 30, 5))
    waiting = flights.waiters
    with pytest.raises(Full, match="MAX_LEASE_WAITS_PER_CONNECTION"):
        await flights.lease(session, "k0", 30, 5)
    assert flights.waiters == waiting
    assert (await flights.lease(FakeSession(2), "k0", 30, 0)) == LeaseAnswer(LeaseStatus.TIMEOUT)
    first = laters[0]
    assert isinstance(first, Later)
    assert await first.wait() == LeaseAnswer(LeaseStatus.TIMEOUT)  # 5 virtual seconds
    assert isinstance(await flights.lease(session, "k0", 30, 5), Later)
