"""Coordination beyond the seed, in one daemon: keepalive and waiting locks,
workflow events, single-flight cache (wksd.coordination: holds, feeds, singleflight)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import trio
import trio.testing

from clientlib.protocol import Response
from wksd.app import Daemon
from wksd.clock import ManualClock
from wksd.config import Config
from wksd.domain import Acquisition

from .peers import Connect, Peer


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
async def daemon(
    nursery: trio.Nursery, sock_path: str, clock: ManualClock
) -> AsyncIterator[Daemon]:
    daemon = Daemon(Config(socket=sock_path, cleanup_interval=0), clock=clock)
    await nursery.start(daemon.run)
    yield daemon
    daemon.shutdown()


async def lock_status(peer: Peer, execution_id: str) -> dict[str, Any]:
    response = await peer.call("lock.status", execution_id)
    return response.result  # type: ignore[no-any-return]


# -- keepalive --------------------------------------------------------------------------
async def test_keepalive_lock_is_released_when_its_connection_closes(
    daemon: Daemon, connect: Connect
) -> None:
    """A keepalive lock is freed the moment its connection closes, not after its TTL."""
    worker, observer = await connect(), await connect()
    taken = await worker.call("lock.acquire", "e1", "w1", 300, True)
    assert taken.result["acquired"] and daemon.holds.kept == 1
    await worker.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()  # the daemon has seen the close
    assert not (await lock_status(observer, "e1"))["locked"]
    assert daemon.holds.kept == 0


async def test_a_plain_lock_survives_its_connection(daemon: Daemon, connect: Connect) -> None:
    """Without keepalive, a lock outlives the connection that took it (the seed's way)."""
    worker, observer = await connect(), await connect()
    await worker.call("lock.acquire", "e1", "w1", 300)
    await worker.stream.aclose()
    await observer.call("ping")  # the close has been seen by now
    assert (await lock_status(observer, "e1"))["workerId"] == "w1"


async def test_releasing_a_keepalive_lock_stops_keeping_it(
    daemon: Daemon, connect: Connect
) -> None:
    """A keepalive lock released by its worker is no longer kept or extended."""
    worker = await connect()
    await worker.call("lock.acquire", "e1", "w1", 300, True)
    assert (await worker.call("lock.release", "e1", "w1")).result["released"]
    assert daemon.holds.kept == 0


# -- waiting for a lock ---------------------------------------------------------------------
async def test_waiters_are_granted_in_order(daemon: Daemon, connect: Connect) -> None:
    """Local waiters get the lock first come, first served, as each holder releases."""
    holder, first, second = await connect(), await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    await first.request(1, "lock.acquire", "e1", "first", 300, False, 10)
    await trio.testing.wait_all_tasks_blocked()
    await second.request(1, "lock.acquire", "e1", "second", 300, False, 10)
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.holds.waiting == 2
    await holder.call("lock.release", "e1", "holder")
    granted = await first.next_response()
    assert granted.result["acquired"] and granted.result["workerId"] == "first"
    assert daemon.holds.waiting == 1
    await first.call("lock.release", "e1", "first")
    assert (await second.next_response()).result["workerId"] == "second"


async def test_a_wait_that_runs_out_is_refused_with_the_holder(
    autojump_clock: trio.testing.MockClock, daemon: Daemon, connect: Connect
) -> None:
    """When `wait` runs out, the answer is acquired: false, naming the holder."""
    holder, waiter = await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    refused = await waiter.call("lock.acquire", "e1", "waiter", 300, False, 0.1)
    assert refused.result == {
        "acquired": False,
        "workerId": "holder",
        "fencingToken": None,
        "expiresAt": None,
    }
    assert daemon.holds.waiting == 0


async def test_other_requests_are_answered_while_one_waits(
    daemon: Daemon, connect: Connect
) -> None:
    """A waiting acquire does not hold up the connection's later requests."""
    holder, worker = await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    await worker.request(1, "lock.acquire", "e1", "worker", 300, False, 10)
    await worker.request(2, "ping")
    assert await worker.next() == Response(2, None, "PONG")
    await holder.call("lock.release", "e1", "holder")
    assert (await worker.next()).msgid == 1


async def test_the_holders_ttl_running_out_wakes_the_waiter(
    autojump_clock: trio.testing.MockClock, daemon: Daemon, connect: Connect, clock: ManualClock
) -> None:
    """A holder that never releases: the waiter gets the lock once the holder's TTL is over."""
    holder, waiter = await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 1)
    await waiter.request(1, "lock.acquire", "e1", "waiter", 300, False, 30)
    await trio.testing.wait_all_tasks_blocked()
    clock.advance(1.5)  # the store's clock: the holder's lock is past its TTL
    waited_from = trio.current_time()
    granted = await waiter.next_response()
    assert granted.result["acquired"]
    # Virtual seconds: at the holder's expiry (1 s TTL), not at the end of the 30 s wait.
    assert trio.current_time() - waited_from < 2


async def test_a_waiter_that_hangs_up_leaves_the_queue(daemon: Daemon, connect: Connect) -> None:
    """A waiter whose connection closes is skipped: the next one gets the lock."""
    holder, gone, patient = await connect(), await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    await gone.request(1, "lock.acquire", "e1", "gone", 300, False, 30)
    await trio.testing.wait_all_tasks_blocked()
    await patient.request(1, "lock.acquire", "e1", "patient", 300, False, 30)
    await trio.testing.wait_all_tasks_blocked()
    await gone.stream.aclose()
    await trio.testing.wait_all_tasks_blocked()
    assert daemon.holds.waiting == 1
    await holder.call("lock.release", "e1", "holder")
    assert (await patient.next_response()).result["workerId"] == "patient"


async def test_shutdown_answers_waiters_at_once(
    autojump_clock: trio.testing.MockClock, sock_path: str, connect: Connect
) -> None:
    """Draining answers a waiting acquire with acquired: false instead of holding the exit."""
    async with trio.open_nursery() as nursery:
        daemon = Daemon(Config(socket=sock_path, shutdown_timeout=30))
        await nursery.start(daemon.run)
        holder, waiter = await connect(), await connect()
        await holder.call("lock.acquire", "e1", "holder", 300)
        await waiter.request(1, "lock.acquire", "e1", "waiter", 300, False, 600)
        await trio.testing.wait_all_tasks_blocked()
        daemon.shutdown()
        asked_at = trio.current_time()
        answer = await waiter.next_response()
        assert trio.current_time() - asked_at < 30  # answered, not cut off by the grace
    assert answer.result["acquired"] is False


async def test_one_connection_may_wait_twice(
    autojump_clock: trio.testing.MockClock, daemon: Daemon, connect: Connect
) -> None:
    """Two waiting acquires on one connection, at once and then again, are both answered."""
    holder, worker = await connect(), await connect()
    await holder.call("lock.acquire", "a", "holder", 300)
    await holder.call("lock.acquire", "b", "holder", 300)
    await worker.request(1, "lock.acquire", "a", "worker", 300, False, 10)
    await worker.request(2, "lock.acquire", "b", "worker", 300, False, 10)
    await trio.testing.wait_all_tasks_blocked()
    await holder.call("lock.release", "b", "holder")
    await holder.call("lock.release", "a", "holder")
    answered = {(await worker.next_response()).msgid for _ in range(2)}
    assert answered == {1, 2}
    await worker.request(3, "lock.acquire", "a", "other", 300, False, 0.05)
    assert (await worker.next_response()).result["acquired"] is False


async def test_a_failing_wait_costs_its_connection_only(
    daemon: Daemon, connect: Connect, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug inside a waiting answer closes that connection; the daemon serves on."""

    async def broken(*args: Any) -> Any:
        raise RuntimeError("a bug")

    holder, victim, bystander = await connect(), await connect(), await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    monkeypatch.setattr(daemon.holds, "_wait", broken)
    await victim.request(1, "lock.acquire", "e1", "victim", 300, False, 10)
    assert await victim.next() is None  # closed
    assert (await bystander.call("ping")).result == "PONG"


async def test_a_text_session_waits_in_line(
    autojump_clock: trio.testing.MockClock, daemon: Daemon, connect: Connect, sock_path: str
) -> None:
    """In a socat session a waiting acquire answers in order, when granted."""
    holder = await connect()
    await holder.call("lock.acquire", "e1", "holder", 300)
    stream = await trio.open_unix_socket(sock_path)
    async with stream:
        await stream.send_all(b"lock.acquire e1 shell 300 false 10\nping\n")
        await trio.testing.wait_all_tasks_blocked()
        await holder.call("lock.release", "e1", "holder")
        await stream.send_eof()
        lines = b""
        while data := await stream.receive_some(65536):
            lines += data
    first, second = lines.decode().splitlines()
    assert json.loads(first)["workerId"] == "shell" and json.loads(second) == "PONG"


@pytest.mark.parametrize(("keepalive", "wait"), [("yes", 0), (True, -1), (True, 3601)])
async def test_keepalive_and_wait_are_checked(
    daemon: Daemon, connect: Connect, keepalive: Any, wait: Any
) -> None:
    """keepalive must be a bool and wait 0 to 3600 seconds."""
    peer = await connect()
    response = await peer.call("lock.acquire", "e1", "w", 300, keepalive, wait)
    assert response.error["code"] == "BAD_REQUEST"


# -- workflow events ------------------------------------------------------------------------
async def test_subscribers_see_every_change_in_order(daemon: Daemon, connect: Connect) -> None:
    """subscribe (all): started, progress, completed are pushed with the new state."""
    watcher, worker = await connect(), await connect()
    assert (await watcher.call("workflow.subscribe")).result == {"subscribed": None}
    await worker.call("workflow.start", "e1", "w", 4)
    await worker.call("workflow.update", "e1", 2, "half")
    await worker.call("workflow.complete", "e1", "completed")
    events = [(await watcher.next_notification()) for _ in range(3)]
    assert [n.method for n in events] == ["workflow.event"] * 3
    assert [n.params[0]["type"] for n in events] == ["started", "progress", "completed"]
    assert events[1].params[0]["state"]["progress"] == 50
    assert {n.params[0]["executionId"] for n in events} == {"e1"}
    assert all(n.params[0]["at"] == n.params[0]["state"]["updatedAt"] for n in events)


async def test_large_data_is_left_out_of_events(daemon: Daemon, connect: Connect) -> None:
    """A change whose event would pass 64 KiB carries the state without its data."""
    watcher, worker = await connect(), await connect()
    await watcher.call("workflow.subscribe")
    await worker.call("workflow.start", "big", "w", 2, {"blob": "x" * 100_000})
    event = (await watcher.next_notification()).params[0]
    assert event["dataOmitted"] is True and event["state"]["data"] == {}
    assert event["state"]["totalSteps"] == 2
    history = (await worker.call("workflow.events", "big")).result["events"]
    assert history[0]["dataOmitted"] is True


async def test_subscribing_to_one_execution(daemon: Daemon, connect: Connect) -> None:
    """A subscription to one id sees that id only; unsubscribe ends it."""
    watcher, worker = await connect(), await connect()
    await watcher.call("workflow.subscribe", "mine")
    await worker.call("workflow.start", "other", "w", 2)
    await worker.call("workflow.start", "mine", "w", 2)
    assert (await watcher.next_notification()).params[0]["executionId"] == "mine"
    assert (await watcher.call("workflow.unsubscribe", "mine")).result == {"unsubscribed": True}
    await worker.call("workflow.update", "mine", 1, "s")
    assert (await watcher.call("ping")).result == "PONG"  # and no event before it
    assert daemon.feeds.subscriptions == 0


async def test_cleanup_announces_stale_runs(
    daemon: Daemon, connect: Connect, clock: ManualClock
) -> None:
    """A run cleanup marks failed is announced as a "stale" event."""
    watcher, worker = await connect(), await connect()
    await worker.call("workflow.start", "e1", "w", 2)
    await watcher.call("workflow.subscribe", "e1")
    clock.advance(3601)
    await worker.call("workflow.cleanup")
    event = (await watcher.next_notification()).params[0]
    assert event["type"] == "stale" and event["state"]["status"] == "failed"


async def test_history_is_kept_and_filtered(
    daemon: Daemon, connect: Connect, clock: ManualClock
) -> None:
    """workflow.events: oldest first, per execution or all, after since_ms, at most limit."""
    worker = await connect()
    await worker.call("workflow.start", "a", "w", 3)
    clock.advance(1)
    since = int(clock.time() * 1000)
    clock.advance(1)
    await worker.call("workflow.start", "b", "w", 3)
    clock.advance(1)
    await worker.call("workflow.update", "a", 1, "s")
    every = (await worker.call("workflow.events")).result["events"]
    assert [(e["executionId"], e["type"]) for e in every] == [
        ("a", "started"),
        ("b", "started"),
        ("a", "progress"),
    ]
    only_a = (await worker.call("workflow.events", "a")).result["events"]
    assert [e["type"] for e in only_a] == ["started", "progress"]
    recent = (await worker.call("workflow.events", None, since)).result["events"]
    assert [e["executionId"] for e in recent] == ["b", "a"]
    assert len((await worker.call("workflow.events", None, None, 1)).result["events"]) == 1
    bad = await worker.call("workflow.events", None, None, 1001)
    assert bad.error["code"] == "BAD_REQUEST"


async def test_a_subscriber_that_does_not_read_loses_events_and_is_told(
    daemon: Daemon, connect: Connect
) -> None:
    """Past the backlog bound, events are dropped, and the count comes once it catches up."""
    watcher, worker = await connect(), await connect()
    await watcher.call("workflow.subscribe")
    padding = {"pad": "x" * 2000}  # so the socket buffers fill quickly
    await worker.call("workflow.start", "e1", "w", 10_000, padding)
    total = 3000
    for step in range(1, total):
        await worker.call("workflow.update", "e1", step, "s")
    received = dropped = 0
    while received + dropped < total:
        notice = await watcher.next_notification()
        if notice.method == "workflow.event":
            received += 1
        else:
            assert notice.method == "workflow.events_dropped"
            dropped += notice.params[0]
    assert dropped > 0 and received + dropped == total


# -- single-flight cache ----------------------------------------------------------------------
async def test_one_caller_computes_while_others_wait(daemon: Daemon, connect: Connect) -> None:
    """The first asker gets the lease; the others wait and get the filled value."""
    computer, waiter = await connect(), await connect()
    lease = (await computer.call("cache.lease", "k")).result
    assert lease["status"] == "lease"
    await waiter.request(1, "cache.lease", "k")
    await trio.testing.wait_all_tasks_blocked()
    filled = await computer.call("cache.fill", "k", lease["token"], {"answer": 42}, 60)
    assert filled.result == {"filled": True}
    assert (await waiter.next_response()).result == {"status": "hit", "value": {"answer": 42}}
    assert (await computer.call("cache.get", "k")).result == {"answer": 42}
    assert daemon.flights.flights == 0


async def test_a_failure_reaches_every_waiter_and_caches_nothing(
    daemon: Daemon, connect: Connect
) -> None:
    """abandon: every waiter gets "failed" with the error; nothing is stored."""
    computer, first, second = await connect(), await connect(), await connect()
    token = (await computer.call("cache.lease", "k")).result["token"]
    for waiter in (first, second):
        await waiter.request(1, "cache.lease", "k")
    await trio.testing.wait_all_tasks_blocked()
    await computer.call("cache.abandon", "k", token, "ValueError: upstream said no")
    for waiter in (first, second):
        answer = (await waiter.next_response()).result
        assert answer == {"status": "failed", "error": "ValueError: upstream said no"}
    assert (await computer.call("cache.get", "k")).result is None


async def test_a_waiter_takes_over_when_the_computer_hangs_up(
    daemon: Daemon, connect: Connect
) -> None:
    """The computing caller's connection closes: a waiter gets the lease instead."""
    computer, waiter = await connect(), await connect()
    await computer.call("cache.lease", "k")
    await waiter.request(1, "cache.lease", "k")
    await trio.testing.wait_all_tasks_blocked()
    await computer.stream.aclose()
    assert (await waiter.next_response()).result["status"] == "lease"


async def test_a_waiter_takes_over_when_the_lease_runs_out(
    autojump_clock: trio.testing.MockClock, daemon: Daemon, connect: Connect, clock: ManualClock
) -> None:
    """A computing caller that never answers loses its lease after lease_ttl."""
    computer, waiter = await connect(), await connect()
    await computer.call("cache.lease", "k", 0.05)
    clock.advance(1)  # the lease key's TTL, on the store's clock
    asked_at = trio.current_time()
    assert (await waiter.call("cache.lease", "k", 30, 10)).result["status"] == "lease"
    assert trio.current_time() - asked_at < 10  # at the lease's end, not the wait's


async def test_not_waiting_answers_timeout_at_once(daemon: Daemon, connect: Connect) -> None:
    """wait 0 while someone computes: timeout, now."""
    computer, other = await connect(), await connect()
    await computer.call("cache.lease", "k")
    assert (await other.call("cache.lease", "k", 30, 0)).result == {"status": "timeout"}


async def test_stale_values_are_served_while_one_caller_refreshes(
    daemon: Daemon, connect: Connect, clock: ManualClock
) -> None:
    """Past ttl but within stale_ttl: everyone gets the value; the first also gets a lease."""
    first, second = await connect(), await connect()
    token = (await first.call("cache.lease", "k")).result["token"]
    await first.call("cache.fill", "k", token, "v1", 10, 60)
    assert (await second.call("cache.lease", "k")).result == {"status": "hit", "value": "v1"}
    clock.advance(11)
    refresh = (await first.call("cache.lease", "k")).result
    assert refresh["status"] == "stale" and refresh["value"] == "v1" and refresh["token"]
    other = (await second.call("cache.lease", "k")).result
    assert other == {"status": "stale", "value": "v1", "token": None}
    await first.call("cache.fill", "k", refresh["token"], "v2", 10, 60)
    assert (await second.call("cache.lease", "k")).result == {"status": "hit", "value": "v2"}


class FakeSession:
    """A connection as Holds sees one: an id, pushes, close callbacks."""

    def __init__(self, session_id: int) -> None:
        self.id = session_id
        self.pushed: list[tuple[str, list[Any]]] = []
        self.closers: list[Any] = []

    def push(self, method: str, params: list[Any]) -> None:
        self.pushed.append((method, params))

    def on_close(self, callback: Any) -> None:
        self.closers.append(callback)

    async def close(self) -> None:
        for callback in self.closers:
            await callback()


class TrioClock:
    """Wall time that follows trio's clock, so MockClock moves TTLs too."""

    def time(self) -> float:
        return 1_700_000_000 + trio.current_time()


async def test_keepalive_outlives_the_ttl_and_reports_a_lost_lock(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A kept 3 s lock is still held after 30 s; taken behind its back, lock.lost is pushed."""
    from wksd.coordination.holds import Holds
    from wksd.domain import Locks
    from wksd.keys import KeySpace
    from wksd.store.memory import MemoryStore

    clock, keys = TrioClock(), KeySpace("wks:")
    store = MemoryStore(clock=clock)
    locks = Locks(store, keys, clock)
    service = Holds(locks, store, keys)
    session = FakeSession(1)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        ttl = 3
        taken = await service.acquire(session, "e1", "w1", ttl, True, 0)
        assert isinstance(taken, Acquisition) and taken.acquired
        await trio.sleep(10 * ttl)  # virtual time: ten TTLs
        assert (await locks.status("e1")).holder == "w1"
        await store.delete(keys.lock("e1"))  # as if it expired, and ...
        await locks.acquire("e1", "thief", 300)  # ... someone else took it
        await trio.sleep(ttl)  # virtual time: the next extension comes in a third of it
        lost = {"executionId": "e1", "workerId": "w1", "reason": "not_owner"}
        assert session.pushed == [("lock.lost", [lost])]
        assert service.kept == 0
        await session.close()  # releases nothing that is not ours
        assert (await locks.status("e1")).holder == "thief"
        nursery.cancel_scope.cancel()
