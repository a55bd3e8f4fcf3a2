"""Degrade to memory and write back on recovery, with a partitioned Redis (wksd.store.failover).

A proxy sits between the store and a private redis-server, so a test can cut
or stall this store's link while Redis itself, and a direct client playing
"another daemon", carry on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from clientlib.errors import Full, Unavailable
from wksd.clock import ManualClock
from wksd.domain import Documents, Locks, Workflows
from wksd.keys import KeySpace
from wksd.metrics import Metrics
from wksd.store.failover import FailoverStore
from wksd.store.memory import MemoryStore
from wksd.store.reconcile import Journal
from wksd.store.redis_target import RedisTarget

from .proxy import Proxy
from .redis_server import RedisServer

KEYS = KeySpace("wks:")
TIMEOUT = 0.3  # seconds: the link's command timeout in these tests


@dataclass
class Host:
    """One daemon's worth of state: its failover store and domain services."""

    store: FailoverStore
    memory: MemoryStore
    metrics: Metrics
    clock: ManualClock
    sessions: Documents
    workflows: Workflows
    locks: Locks

    async def outage(self, proxy: Proxy) -> None:
        proxy.cut()
        # The store notices on its next command; a read makes it notice now.
        await self.store.get("wks:poke")
        assert self.store.backend == "memory"

    async def recovered(self, proxy: Proxy) -> None:
        proxy.restore()
        with trio.fail_after(10):
            await self.store.wait_for_backend("redis")


@pytest.fixture
async def proxy(redis_server: RedisServer, nursery: trio.Nursery) -> Proxy:
    proxy = Proxy(redis_server.port)
    await nursery.start(proxy.run)
    return proxy


async def make_host(
    nursery: trio.Nursery, port: int, *, max_keys: int = 1000, fail_closed: bool = False
) -> Host:
    clock = ManualClock()
    memory = MemoryStore(
        keys=KEYS,
        clock=clock,
        max_keys=max_keys,
        evictable=lambda key: key.startswith(KEYS.cache_prefix),
    )
    metrics = Metrics()
    store = FailoverStore(
        memory,
        RedisTarget(port=port),
        metrics,
        timeout=TIMEOUT,
        backoff_max=0.2,
        locks_fail_closed=fail_closed,
    )
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    return Host(
        store,
        memory,
        metrics,
        clock,
        Documents(store, KEYS.session, "session"),
        Workflows(store, KEYS, clock, stale_after=3600, sleep=trio.sleep),
        Locks(store, KEYS, clock),
    )


@pytest.fixture
async def host(proxy: Proxy, nursery: trio.Nursery) -> AsyncIterator[Host]:
    yield await make_host(nursery, proxy.port)


async def test_this_hosts_writes_are_known_during_an_outage(host: Host, proxy: Proxy) -> None:
    """What this host wrote while Redis served is read back from memory during an outage."""
    await host.sessions.set("u1", {"role": "admin"}, 60)
    await host.workflows.start("e1", "w", 4, {})
    await host.locks.acquire("e1", "worker-1", 60)
    await host.outage(proxy)
    assert await host.sessions.get("u1") == {"role": "admin"}
    state = await host.workflows.update("e1", 1, "step", None)  # no NOT_FOUND
    assert state["progress"] == 25
    refused = await host.locks.acquire("e1", "worker-2", 60)
    assert not refused.acquired and refused.holder == "worker-1"


async def test_outage_writes_are_written_back(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """Sessions, deletes, cache entries, workflows and locks made in memory reach Redis."""
    await host.sessions.set("gone", {"x": 1}, 60)
    await host.outage(proxy)
    await host.sessions.set("u1", {"n": 1}, 60)
    await host.sessions.delete("gone")
    await host.store.set("wks:cache:api:h", b"[1,2]", 30_000)
    await host.workflows.start("e1", "w", 4, {"a": 1})
    await host.workflows.update("e1", 2, "half", None)
    lock = await host.locks.acquire("e2", "worker-1", 60)
    await host.recovered(proxy)
    with redis_server.client() as direct:
        assert json.loads(direct.get("wks:session:u1")) == {"n": 1}
        assert 59_000 < direct.pttl("wks:session:u1") <= 60_000
        assert direct.get("wks:session:gone") is None
        assert direct.get("wks:cache:api:h") == b"[1,2]"
        assert json.loads(direct.get("wks:workflow:e1"))["progress"] == 50
        assert direct.smembers("wks:executions:active") == {b"e1"}
        assert direct.get("wks:lock:execution:e2") == b"worker-1"
        assert direct.get("wks:lock:token:e2") == b"%d:worker-1" % lock.token
        assert int(direct.get("wks:lock:fencing")) >= lock.token
    assert host.store.pending_writes == 0
    assert 'wksd_reconciled_keys_total{outcome="written"}' in host.metrics.render()


async def test_reads_during_an_outage_write_nothing_back(host: Host, proxy: Proxy) -> None:
    """Only writes are journaled."""
    await host.outage(proxy)
    await host.sessions.get("u1")
    await host.workflows.stats()
    assert host.store.pending_writes == 0


async def test_newer_workflow_in_redis_is_kept(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """A state another daemon updated later than our outage update stays; a conflict is counted."""
    await host.workflows.start("e1", "w", 4, {})
    await host.outage(proxy)
    ours = await host.workflows.update("e1", 1, "ours", None)
    theirs = {**ours, "currentStep": "theirs", "updatedAt": ours["updatedAt"] + 1000}
    with redis_server.client() as direct:
        direct.set("wks:workflow:e1", json.dumps(theirs))
    await host.recovered(proxy)
    with redis_server.client() as direct:
        assert json.loads(direct.get("wks:workflow:e1"))["currentStep"] == "theirs"
    assert 'wksd_reconciled_keys_total{outcome="conflict"} 1.0' in host.metrics.render()


async def test_older_workflow_in_redis_is_replaced(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """Our outage update replaces an older state, and completion leaves the active set."""
    await host.workflows.start("e1", "w", 4, {})
    await host.outage(proxy)
    host.clock.advance(5)
    await host.workflows.complete("e1", "completed", None, {"total": 3})
    await host.recovered(proxy)
    with redis_server.client() as direct:
        state = json.loads(direct.get("wks:workflow:e1"))
        assert state["status"] == "completed" and state["data"] == {"total": 3}
        assert direct.smembers("wks:executions:active") == set()
        assert direct.zscore("wks:executions:finished", "e1") == state["completedAt"]


async def test_lock_taken_elsewhere_during_the_outage_stays_theirs(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """Both sides granted the lock: Redis's holder keeps it; ours finds it is not the owner."""
    await host.outage(proxy)
    assert (await host.locks.acquire("e1", "ours", 60)).acquired
    with redis_server.client() as direct:
        direct.set("wks:lock:execution:e1", "theirs", px=60_000)
    await host.recovered(proxy)
    with redis_server.client() as direct:
        assert direct.get("wks:lock:execution:e1") == b"theirs"
    assert await host.locks.extend("e1", "ours", 60) == "not_owner"
    assert 'wksd_reconciled_keys_total{outcome="conflict"} 1.0' in host.metrics.render()


async def test_lock_released_during_the_outage_is_released_in_redis(
    host: Host, proxy: Proxy, redis_server: RedisServer
) -> None:
    """A release made in memory frees the lock in Redis too, if the owner still holds it."""
    await host.locks.acquire("e1", "w1", 60)
    await host.outage(proxy)
    assert await host.locks.release("e1", "w1") == "released"
    await host.recovered(proxy)
    with redis_server.client() as direct:
        assert direct.get("wks:lock:execution:e1") is None


async def test_fencing_tokens_never_go_back(host: Host, proxy: Proxy) -> None:
    """Tokens issued in memory are above Redis's, and Redis's counter is raised past them."""
    first = (await host.locks.acquire("e1", "w", 60)).token
    await host.outage(proxy)
    during = [(await host.locks.acquire(f"o{i}", "w", 60)).token for i in range(3)]
    await host.recovered(proxy)
    after = (await host.locks.acquire("e9", "w", 60)).token
    assert first < during[0] < during[1] < during[2] < after


async def test_stalled_link_falls_back_within_the_timeout(host: Host, proxy: Proxy) -> None:
    """With Redis silent (not closed), a request is answered from memory after the timeout."""
    await host.sessions.set("u1", {"v": 1}, 60)
    proxy.stall()
    with trio.fail_after(TIMEOUT * 10):  # the timeout, plus a generous margin
        assert await host.sessions.get("u1") == {"v": 1}
    assert host.store.backend == "memory"
    assert host.store.redis_status == "down"


async def test_requests_in_flight_when_redis_stalls_all_succeed(host: Host, proxy: Proxy) -> None:
    """Every request waiting on the link when it stalls is served from memory instead."""
    for index in range(20):
        await host.sessions.set(f"u{index}", {"i": index}, 60)
    proxy.stall()
    results: dict[int, object] = {}

    async def read(index: int) -> None:
        results[index] = await host.sessions.get(f"u{index}")

    with trio.fail_after(TIMEOUT * 10):
        async with trio.open_nursery() as nursery:
            for index in range(20):
                nursery.start_soon(read, index)
    assert results == {index: {"i": index} for index in range(20)}


async def test_locks_fail_closed_when_asked(proxy: Proxy, nursery: trio.Nursery) -> None:
    """With WKSD_LOCKS_FAIL_CLOSED, lock.acquire during an outage is UNAVAILABLE."""
    host = await make_host(nursery, proxy.port, fail_closed=True)
    assert (await host.locks.acquire("e1", "w", 60)).acquired
    await host.outage(proxy)
    with pytest.raises(Unavailable):
        await host.locks.acquire("e2", "w", 60)
    assert await host.locks.release("e1", "w") == "released"


async def test_locks_fail_closed_when_the_link_breaks_mid_call(
    proxy: Proxy, nursery: trio.Nursery
) -> None:
    """With WKSD_LOCKS_FAIL_CLOSED, an acquire whose link stalls under it is UNAVAILABLE too."""
    host = await make_host(nursery, proxy.port, fail_closed=True)
    proxy.stall()
    with pytest.raises(Unavailable), trio.fail_after(TIMEOUT * 10):
        await host.locks.acquire("e1", "w", 60)


async def test_ping_reports_up_with_latency_then_down(host: Host, proxy: Proxy) -> None:
    """ping: ("up", ms) while connected; ("down", None) once the link is cut."""
    status, latency = await host.store.ping()
    assert status == "up" and latency is not None and latency >= 0
    await host.outage(proxy)
    assert await host.store.ping() == ("down", None)


async def test_copies_make_way_but_outage_writes_do_not(
    proxy: Proxy, nursery: trio.Nursery
) -> None:
    """Mirrored copies are evicted for room; writes made during an outage are kept, then FULL."""
    host = await make_host(nursery, proxy.port, max_keys=10)
    for index in range(50):  # far past the bound: copies give way, no error
        await host.sessions.set(f"s{index}", {}, 60)
    assert len(host.memory) <= 10
    await host.outage(proxy)
    with pytest.raises(Full):
        for index in range(11):
            await host.sessions.set(f"outage{index}", {}, 60)
    kept = [await host.sessions.get(f"outage{index}") for index in range(10)]
    assert kept == [{}] * 10


async def test_requests_at_start_wait_for_the_first_connection(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """A lock taken the moment the daemon starts is taken in Redis, not in memory alone."""
    store = FailoverStore(
        MemoryStore(), RedisTarget(port=redis_server.port), Metrics(), timeout=TIMEOUT
    )
    await nursery.start(store.run)  # returns before the connection is made
    assert store.backend == "memory"
    outcome = await store.lock_acquire("e1", "early", 60_000)
    assert outcome.acquired and store.pending_writes == 0
    with redis_server.client() as direct:
        assert direct.get("wks:lock:execution:e1") == b"early"


async def test_the_failover_serves_its_memory_stores_key_space_in_redis_too(
    redis_server: RedisServer, nursery: trio.Nursery
) -> None:
    """Given one key space, with the memory store, the failover names Redis's keys by it."""
    memory = MemoryStore(keys=KeySpace("other:"))
    store = FailoverStore(memory, RedisTarget(port=redis_server.port), Metrics(), timeout=TIMEOUT)
    await nursery.start(store.run)
    with trio.fail_after(10):
        await store.wait_for_backend("redis")
    assert store.keys == KeySpace("other:")
    assert (await store.lock_acquire("e1", "w1", 60_000)).acquired
    await store.cache_fill("k", b"1", 60_000, None)
    with redis_server.client() as direct:
        assert direct.get("other:lock:execution:e1") == b"w1"
        assert direct.get("other:cache:api:k") == b"1"
        assert direct.get("wks:lock:execution:e1") is None
    assert await memory.get("other:lock:execution:e1") == b"w1"  # the mirror, under it too


async def test_requests_at_start_fall_back_when_redis_is_down(nursery: trio.Nursery) -> None:
    """With no Redis at all, the first requests are served from memory, without an error."""
    from .redis_server import free_port

    store = FailoverStore(MemoryStore(), RedisTarget(port=free_port()), Metrics(), timeout=TIMEOUT)
    await nursery.start(store.run)
    with trio.fail_after(TIMEOUT * 10):
        await store.set("wks:session:u", b"{}", 60_000)
    assert store.backend == "memory" and store.pending_writes == 1


def test_journal_keeps_a_change_made_while_writing_back() -> None:
    """Settling an old version of an entry that changed again keeps the new change."""
    journal = Journal()
    journal.note("key", "k")
    [(kind, name, version)] = journal.pending()
    journal.note("key", "k")  # changed again while being written back
    assert not journal.settle(kind, name, version)
    assert len(journal) == 1
    [(_, _, newer)] = journal.pending()
    assert journal.settle("key", "k", newer)
    assert len(journal) == 0
