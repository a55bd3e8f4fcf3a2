"""Waiting for locks: what it costs Redis, its bound per connection, and that
a grant never goes to a peer that has gone (wksd.coordination.holds)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from clientlib.errors import Full
from wksd.clock import SystemClock
from wksd.coordination.holds import MAX_WAITS_PER_CONNECTION, POLL_BATCH, POLL_INTERVAL, Holds
from wksd.domain import Acquisition, Locks, LockState
from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.session import Later
from wksd.store.failover import FailoverStore
from wksd.store.memory import MemoryStore
from wksd.store.redis_target import RedisTarget

from .polling import await_until
from .redis_server import RedisServer
from .test_coordination import FakeSession, TrioClock

#: Waiters of the measurement, each on an execution id of its own (the case
#: that cost one poll per waiter a second).
WAITERS = 2000
#: Seconds the command rate is measured over.
MEASURED = 3.0


def commands_processed(server: RedisServer) -> int:
    with server.client() as direct:
        return int(direct.info("stats")["total_commands_processed"])


async def test_2000_waiters_cost_redis_about_one_command_a_second(
    redis_server: RedisServer,
) -> None:
    """2000 waits on 2000 held locks: Redis sees a poll of them all per interval, not one each."""
    keys = KeySpace("wks:")
    store = FailoverStore(
        MemoryStore(keys=keys, clock=SystemClock()),
        RedisTarget(port=redis_server.port),
        Metrics(),
        timeout=5.0,
    )
    locks = CountingLocks(store, keys, SystemClock())
    service = Holds(locks, store, keys)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.wait_for_backend("redis")
        await nursery.start(service.run)
        for index in range(WAITERS):
            await locks.acquire(f"e{index}", "holder", 3600)
        locks.answered = 0  # the waiters' tries from here on
        per_session = MAX_WAITS_PER_CONNECTION
        for index in range(WAITERS):
            session = FakeSession(index // per_session)
            later = await service.acquire(session, f"e{index}", "waiter", 300, False, 3600)
            assert isinstance(later, Later)
            nursery.start_soon(later.wait)
        # Every waiter has tried twice (on asking, then as its queue's head) and waits.
        await await_until(lambda: locks.answered >= 2 * WAITERS, "every waiter's tries")
        assert service.waiting == WAITERS
        before, started = commands_processed(redis_server), time.monotonic()
        await trio.sleep(MEASURED)
        after, elapsed = commands_processed(redis_server), time.monotonic() - started
        rate = (after - before - 1) / elapsed  # less the INFO of the first reading
        print(f"\n{WAITERS} waiters on {WAITERS} held locks: {rate:.1f} Redis commands/s")
        assert rate < 50
        nursery.cancel_scope.cancel()


class CountingLocks(Locks):
    """Locks that count the tries Redis has answered."""

    answered = 0

    async def acquire(self, *args: Any) -> Any:
        result = await super().acquire(*args)
        self.answered += 1
        return result


class CountingStore(MemoryStore):
    """A memory store that remembers the size of each get_many (each poll's MGET)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.reads: list[int] = []

    async def get_many(self, keys: list[str]) -> list[bytes | None]:
        self.reads.append(len(keys))
        return await super().get_many(keys)


async def test_the_poll_wakes_waiters_of_locks_freed_unannounced(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Locks DELeted behind the daemon's back (the seed's unlock) are granted at the next poll."""
    clock, keys = TrioClock(), KeySpace("wks:")
    store = CountingStore(clock=clock)
    service = Holds(Locks(store, keys, clock), store, keys)
    count = POLL_BATCH + 5
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        results: list[Any] = []

        async def wait_for(later: Later) -> None:
            results.append(await later.wait())

        for index in range(count):
            await service.acquire(FakeSession(0), f"e{index}", "holder", 3600, False, 0)
            later = await service.acquire(FakeSession(1 + index), f"e{index}", "w", 300, False, 60)
            assert isinstance(later, Later)
            nursery.start_soon(wait_for, later)
        await trio.sleep(POLL_INTERVAL * 3)
        assert results == [] and store.reads and max(store.reads) <= POLL_BATCH
        polls = len(store.reads)
        for index in range(count):
            await store.delete(keys.lock(f"e{index}"))  # no release, no announcement
        await trio.sleep(POLL_INTERVAL * 1.5)
        assert len(results) == count and all(r.acquired for r in results)
        assert len(store.reads) - polls <= 4  # two polls of two MGETs, not one per waiter
        nursery.cancel_scope.cancel()


# -- the bound per connection --------------------------------------------------------------
class Service(Holds):
    """The Holds on a memory store, with the lock's status at hand."""

    def __init__(self, store: MemoryStore, keys: KeySpace, clock: TrioClock) -> None:
        self.locks = Locks(store, keys, clock)
        super().__init__(self.locks, store, keys)

    async def status(self, execution_id: str) -> LockState:
        return await self.locks.status(execution_id)


@pytest.fixture
async def service(autojump_clock: trio.testing.MockClock) -> AsyncIterator[Service]:
    clock = TrioClock()
    service = Service(MemoryStore(clock=clock), KeySpace("wks:"), clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        yield service
        nursery.cancel_scope.cancel()


async def test_waits_beyond_the_bound_are_refused_and_change_nothing(
    service: Service, nursery: trio.Nursery
) -> None:
    """A connection with MAX_WAITS_PER_CONNECTION waits gets FULL for one more; others may wait."""
    greedy, other = FakeSession(1), FakeSession(2)
    holder = FakeSession(3)
    for index in range(MAX_WAITS_PER_CONNECTION):
        await service.acquire(holder, f"e{index}", "holder", 300, False, 0)
        later = await service.acquire(greedy, f"e{index}", "w1", 300, False, 60)
        assert isinstance(later, Later)
        nursery.start_soon(later.wait)
    with pytest.raises(Full, match="MAX_WAITS_PER_CONNECTION"):
        await service.acquire(greedy, "free", "w1", 300, False, 60)  # not even a free lock
    assert service.waiting == MAX_WAITS_PER_CONNECTION
    assert (await service.status("free")).holder is None
    assert isinstance(await service.acquire(other, "e0", "w2", 300, False, 60), Later)
    # Without wait there is no bound: an answer at once.
    answer = await service.acquire(greedy, "free", "w1", 300, False, 0)
    assert isinstance(answer, Acquisition) and answer.acquired


async def test_a_finished_wait_frees_its_place(
    service: Service, autojump_clock: trio.testing.MockClock
) -> None:
    """Once a wait has ended, the connection may wait again."""
    session, holder = FakeSession(1), FakeSession(2)
    await service.acquire(holder, "e1", "holder", 300, False, 0)
    for _ in range(MAX_WAITS_PER_CONNECTION + 1):
        later = await service.acquire(session, "e1", "w1", 300, False, 1)
        assert isinstance(later, Later)
        assert not (await later.wait()).acquired
    assert service.waiting == 0


# -- never granted to a gone peer ----------------------------------------------------------
class SlowStore(MemoryStore):
    """A memory store whose lock_acquire takes a while, like a Redis round trip."""

    delay = 1.0

    async def lock_acquire(self, *args: Any, **kwargs: Any) -> Any:
        await trio.sleep(self.delay)
        return await super().lock_acquire(*args, **kwargs)


async def test_a_wait_cancelled_mid_grant_leaves_the_lock_free(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The peer goes while the grant is in flight: the grant is undone and the next waiter goes."""
    clock, keys = TrioClock(), KeySpace("wks:")
    store = SlowStore(clock=clock)
    service = Service(store, keys, clock)
    gone, patient = FakeSession(1), FakeSession(2)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.acquire(FakeSession(3), "e1", "holder", 300, False, 0)
        first = await service.acquire(gone, "e1", "w1", 300, True, 60)
        second = await service.acquire(patient, "e1", "w2", 300, False, 60)
        assert isinstance(first, Later) and isinstance(second, Later)
        results: list[Any] = []

        async def wait_for(later: Later) -> None:
            results.append(await later.wait())

        with trio.CancelScope() as scope:
            async with trio.open_nursery() as waits:
                waits.start_soon(wait_for, first)
                await trio.sleep(5)
                await service.release(FakeSession(3), "e1", "holder")
                await trio.sleep(store.delay / 2)  # the grant to w1 is in flight
                scope.cancel()  # w1's peer has gone
        assert results == []
        assert service.kept == 0
        answer = await second.wait()
        assert answer.acquired and answer.holder == "w2"
        assert (await service.status("e1")).holder == "w2"
        nursery.cancel_scope.cancel()


async def test_revoke_undoes_a_grant_that_could_not_be_delivered(service: Service) -> None:
    """revoke(result) releases exactly that holding, drops its keepalive, wakes the next."""
    gone, patient = FakeSession(1), FakeSession(2)
    await service.acquire(FakeSession(3), "e1", "holder", 300, False, 0)
    first = await service.acquire(gone, "e1", "w1", 300, True, 60)
    second = await service.acquire(patient, "e1", "w2", 300, False, 60)
    assert isinstance(first, Later) and isinstance(second, Later)
    assert first.revoke is not None
    async with trio.open_nursery() as nursery:
        results: list[Any] = []

        async def wait_for(later: Later) -> None:
            results.append(await later.wait())

        nursery.start_soon(wait_for, first)
        nursery.start_soon(wait_for, second)
        await trio.testing.wait_all_tasks_blocked()
        await service.release(FakeSession(3), "e1", "holder")
        await trio.testing.wait_all_tasks_blocked()
        assert len(results) == 1 and results[0].holder == "w1" and service.kept == 1
        await first.revoke(results[0])  # the server could not deliver it
        await trio.testing.wait_all_tasks_blocked()
        assert service.kept == 0
        assert results[1].acquired and results[1].holder == "w2"
    assert (await service.status("e1")).holder == "w2"


async def test_revoke_leaves_a_later_holding_alone(service: Service) -> None:
    """A revoke that comes after the lock changed hands releases nothing."""
    session = FakeSession(1)
    await service.acquire(FakeSession(3), "e1", "holder", 300, False, 0)
    later = await service.acquire(session, "e1", "w1", 300, False, 60)
    assert isinstance(later, Later) and later.revoke is not None
    async with trio.open_nursery() as nursery:
        results: list[Any] = []

        async def wait_for() -> None:
            results.append(await later.wait())

        nursery.start_soon(wait_for)
        await trio.testing.wait_all_tasks_blocked()
        await service.release(FakeSession(3), "e1", "holder")
        await trio.testing.wait_all_tasks_blocked()
    granted = results[0]
    await service.release(session, "e1", "w1")
    again = await service.acquire(FakeSession(4), "e1", "w1", 300, False, 0)  # a new holding
    assert isinstance(again, Acquisition) and again.token > granted.token
    await later.revoke(granted)
    assert (await service.status("e1")).holder == "w1"
    await later.revoke(Acquisition(False, "x", None, None))  # nothing was granted
    assert (await service.status("e1")).holder == "w1"
