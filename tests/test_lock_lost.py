"""Locks across an outage: the keepalive gives a lock up in time and the holder
is told (wksd.coordination.holds, clientlib._held, both clients' execute_with_lock).

The daemon's side runs on trio's MockClock over a store whose extensions fail
or hang on demand; the clients' side goes through a real daemon, the binary
on its memory default where another connection can take the lock away, and
an in-process one where extensions are made to fail.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from clientlib import AsyncClient, Client, LockLost, LockResult, Unavailable
from wksd.app import Daemon
from wksd.clock import ManualClock
from wksd.config import Config
from wksd.coordination.holds import Holds, retry_interval
from wksd.domain import Locks, LockStatus
from wksd.keys import KeySpace
from wksd.store.memory import MemoryStore

from .polling import wait_until
from .processes import DaemonProcess
from .redis_server import RedisServer

Runner = Callable[[Callable[[], Any]], None]


# -- the daemon's side: the keepalive, on a mock clock -------------------------------


class TrioClock:
    """Wall time that follows trio's clock, so MockClock moves TTLs too."""

    def time(self) -> float:
        return 1_700_000_000 + trio.current_time()


class FlakyStore:
    """A MemoryStore whose ``lock_extend`` fails (UNAVAILABLE) or hangs while told to."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.failing = False
        self.hanging = False
        self.extends: list[float] = []  # when each extension was tried

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def lock_extend(self, execution_id: str, owner: str, ttl_ms: int) -> str:
        self.extends.append(trio.current_time())
        if self.hanging:
            await trio.sleep_forever()
        if self.failing:
            raise Unavailable("Redis is unreachable and locks fail closed")
        return await self.inner.lock_extend(execution_id, owner, ttl_ms)


class FakeSession:
    """A connection as Holds sees one; it notes when each push came."""

    def __init__(self, session_id: int) -> None:
        self.id = session_id
        self.pushed: list[tuple[float, str, list[Any]]] = []
        self.closers: list[Any] = []

    def push(self, method: str, params: list[Any]) -> None:
        self.pushed.append((trio.current_time(), method, params))

    def on_close(self, callback: Any) -> None:
        self.closers.append(callback)


class Kept:
    """A Holds over a FlakyStore, running in a nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        clock, self.keys = TrioClock(), KeySpace("wks:")
        self.store = FlakyStore(MemoryStore(clock=clock))
        self.locks = Locks(self.store, self.keys, clock)  # type: ignore[arg-type]
        self.service = Holds(self.locks, self.store, self.keys)  # type: ignore[arg-type]
        self.nursery = nursery

    async def holder(self) -> str | None:
        return (await self.locks.status("e1")).holder


@pytest.fixture
async def kept() -> AsyncIterator[Kept]:
    """The service; each test asks for ``autojump_clock`` itself (pytest-trio's rule)."""
    async with trio.open_nursery() as nursery:
        kept = Kept(nursery)
        await nursery.start(kept.service.run)
        yield kept
        nursery.cancel_scope.cancel()


def lost(execution_id: str, worker_id: str, reason: str) -> tuple[str, list[Any]]:
    return ("lock.lost", [{"executionId": execution_id, "workerId": worker_id, "reason": reason}])


async def test_failing_extensions_give_the_lock_up_before_its_confirmed_expiry(
    kept: Kept, autojump_clock: trio.testing.MockClock
) -> None:
    """Extensions failing from t=25 on: the lock extended at t=20 for 30 s is
    declared lost (reason expired) within one retry interval before t=50, never after."""
    session, ttl = FakeSession(1), 30
    start = trio.current_time()
    assert (await kept.service.acquire(session, "e1", "w1", ttl, True, 0)).acquired
    await trio.sleep(25)  # extensions at 10 and 20 succeed
    kept.store.failing = True
    confirmed = start + 20 + ttl
    await trio.sleep(40)
    assert [(method, params) for _, method, params in session.pushed] == [
        lost("e1", "w1", "expired")
    ]
    pushed_at = session.pushed[0][0]
    assert confirmed - retry_interval(ttl) <= pushed_at <= confirmed
    assert kept.service.kept == 0
    # Retried more often than every ttl/3 once one failed, and then no more.
    tries = [at - start for at in kept.store.extends]
    assert tries[:2] == [10, 20]
    gaps = [later - earlier for earlier, later in itertools.pairwise(tries[2:])]
    assert len(tries) > 10 and all(gap <= retry_interval(ttl) for gap in gaps)
    assert tries[-1] < pushed_at - start


async def test_a_short_outage_costs_no_lock(
    kept: Kept, autojump_clock: trio.testing.MockClock
) -> None:
    """Extensions failing for a few seconds are retried until one succeeds; nobody is told."""
    session, ttl = FakeSession(1), 9
    assert (await kept.service.acquire(session, "e1", "w1", ttl, True, 0)).acquired
    await trio.sleep(2)
    kept.store.failing = True
    await trio.sleep(4)  # the extension at 3 and its retries fail
    kept.store.failing = False
    await trio.sleep(10 * ttl)
    assert session.pushed == [] and kept.service.kept == 1
    assert await kept.holder() == "w1"


async def test_an_extension_that_hangs_is_given_up_in_time(
    kept: Kept, autojump_clock: trio.testing.MockClock
) -> None:
    """An extension that never answers does not make the lock's loss late."""
    session, ttl = FakeSession(1), 3
    start = trio.current_time()
    kept.store.hanging = True
    assert (await kept.service.acquire(session, "e1", "w1", ttl, True, 0)).acquired
    await trio.sleep(2 * ttl)
    assert [(method, params) for _, method, params in session.pushed] == [
        lost("e1", "w1", "expired")
    ]
    assert session.pushed[0][0] <= start + ttl
    assert kept.store.extends == [start + 1]  # one try, abandoned at the deadline


async def test_a_taken_lock_is_reported_with_its_reason(
    kept: Kept, autojump_clock: trio.testing.MockClock
) -> None:
    """An extension finding another holder pushes lock.lost with reason not_owner."""
    session = FakeSession(1)
    assert (await kept.service.acquire(session, "e1", "w1", 3, True, 0)).acquired
    await kept.store.delete(kept.keys.lock("e1"))  # as if it expired, and ...
    await kept.locks.acquire("e1", "thief", 300)  # ... someone else took it
    await trio.sleep(3)
    assert [(method, params) for _, method, params in session.pushed] == [
        lost("e1", "w1", "not_owner")
    ]


async def test_a_release_through_another_connection_tells_the_keeper(
    kept: Kept, autojump_clock: trio.testing.MockClock
) -> None:
    """The connection keeping a lock hears (reason released) when another one releases it."""
    keeper, other = FakeSession(1), FakeSession(2)
    assert (await kept.service.acquire(keeper, "e1", "w1", 30, True, 0)).acquired
    assert await kept.service.release(other, "e1", "w1") == LockStatus.RELEASED
    assert [(method, params) for _, method, params in keeper.pushed] == [
        lost("e1", "w1", "released")
    ]
    assert other.pushed == [] and kept.service.kept == 0
    # Its own release tells it nothing.
    assert (await kept.service.acquire(keeper, "e2", "w1", 30, True, 0)).acquired
    await kept.service.release(keeper, "e2", "w1")
    assert len(keeper.pushed) == 1


# -- the sync client, against the daemon binary -----------------------------------------


@pytest.fixture
def path(daemon_process: DaemonProcess) -> str:
    return daemon_process.path


def hand_over_and_take(path: str, thief: Client) -> None:
    """Take w1's lock on e1 from behind its keeper's back, telling it nothing.

    Another connection takes the same lock again as w1 (so it keeps it now,
    and the first keeper is not told), then hangs up, which releases it; the
    thief then takes it.
    """
    with Client(path) as second:
        assert second.acquire_lock("e1", "w1", keepalive=True)
    wait_until(lambda: thief.lock_workflow_execution("e1", "thief"), 10, "the hand-over")


def test_sync_lock_lost_sets_the_flag_calls_back_and_raises(path: str) -> None:
    """A lock released by another connection: lock.lost, on_lost(lock), then LockLost at exit."""
    called: list[LockResult] = []
    with Client(path) as c, Client(path) as other:
        with (
            pytest.raises(LockLost) as raised,
            c.execute_with_lock("e1", "w1", on_lost=called.append) as lock,
        ):
            assert not lock.lost
            assert other.unlock_workflow_execution("e1", "w1")
            assert other.lock_workflow_execution("e1", "thief")
            wait_until(lambda: lock.lost, 10, "lock.lost")  # a non-blocking read each time
            assert called == [lock] and lock.lost_reason == "released"
        assert raised.value.reason == "released" and raised.value.execution_id == "e1"
        assert c.is_workflow_locked("e1").worker_id == "thief"  # the release took nothing
        assert called == [lock]  # once


def test_sync_client_applies_a_push_during_any_call(path: str) -> None:
    """The sync client sees lock.lost while making other calls, without checking the flag."""
    called: list[LockResult] = []
    with Client(path) as c, Client(path) as other:
        lock = c.acquire_lock("e1", "w1", keepalive=True, on_lost=called.append)
        assert other.unlock_workflow_execution("e1", "w1")
        wait_until(lambda: c.ping() == "PONG" and bool(called), 10, "the callback")
        assert lock.lost_reason == "released"


def test_sync_release_finding_another_owner_raises_lock_lost(path: str) -> None:
    """Untold, the block still ends in LockLost when its release finds another owner."""
    with Client(path) as c, Client(path) as thief:
        with pytest.raises(LockLost) as raised, c.execute_with_lock("e1", "w1") as lock:
            hand_over_and_take(path, thief)
            assert not lock.lost
        assert raised.value.reason == "not_owner"
        assert thief.is_workflow_locked("e1").worker_id == "thief"


def test_sync_block_error_wins_and_notes_the_loss(path: str) -> None:
    """A block that raises keeps its own exception; a note says the lock was lost."""
    with Client(path) as c, Client(path) as other:
        with pytest.raises(KeyError) as raised, c.execute_with_lock("e1", "w1"):
            other.unlock_workflow_execution("e1", "w1")
            raise KeyError("mine")
        assert any("was lost" in note for note in raised.value.__notes__)


def test_sync_daemon_restart_in_the_block_loses_the_lock(daemon_process: DaemonProcess) -> None:
    """The connection that kept the lock ends: lost (disconnected), then LockLost."""
    called: list[LockResult] = []
    with Client(daemon_process.path) as c:
        with (
            pytest.raises(LockLost) as raised,
            c.execute_with_lock("e1", "w1", on_lost=called.append),
        ):
            daemon_process.stop()
            daemon_process.start()
        assert raised.value.reason == "disconnected" and len(called) == 1


def test_closing_the_client_is_not_a_loss(path: str) -> None:
    """A keepalive lock released by closing its client is not reported lost."""
    called: list[LockResult] = []
    c = Client(path)
    lock = c.acquire_lock("e1", "w1", keepalive=True, on_lost=called.append)
    c.close()
    assert not lock.lost and called == []


# -- the async client, on trio and asyncio, against the daemon binary ---------------------


@pytest.fixture(params=["trio", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    def runner(scenario: Callable[[], Any]) -> None:
        anyio.run(scenario, backend=request.param)

    return runner


def test_async_lock_lost_sets_the_flag_calls_back_and_raises(run: Runner, path: str) -> None:
    """The reader marks the lock lost and calls on_lost as the push arrives; LockLost at exit."""

    async def scenario() -> None:
        told = anyio.Event()
        called: list[LockResult] = []

        def on_lost(lock: LockResult) -> None:
            called.append(lock)
            told.set()

        async with AsyncClient(path) as c, AsyncClient(path) as other:
            with pytest.raises(LockLost) as raised:
                async with c.execute_with_lock("e1", "w1", on_lost=on_lost) as lock:
                    assert not lock.lost
                    assert await other.unlock_workflow_execution("e1", "w1")
                    assert await other.lock_workflow_execution("e1", "thief")
                    with anyio.fail_after(10):
                        await told.wait()
                    assert lock.lost and lock.lost_reason == "released" and called == [lock]
            assert raised.value.reason == "released"
            assert (await c.is_workflow_locked("e1")).worker_id == "thief"

    run(scenario)


def test_async_on_lost_can_stop_the_work(run: Runner, path: str) -> None:
    """on_lost may cancel the block's scope: the work stops the moment the lock goes."""

    async def scenario() -> None:
        async with AsyncClient(path) as c, AsyncClient(path) as other:
            with anyio.fail_after(10), anyio.CancelScope() as scope:
                async with c.execute_with_lock(
                    "e1", "w1", on_lost=lambda _: scope.cancel()
                ) as lock:
                    await other.unlock_workflow_execution("e1", "w1")
                    await anyio.sleep_forever()
            assert scope.cancelled_caught and lock.lost

    run(scenario)


def test_async_release_finding_another_owner_raises_lock_lost(run: Runner, path: str) -> None:
    """Untold, the block still ends in LockLost when its release finds another owner."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            with pytest.raises(LockLost) as raised:
                async with c.execute_with_lock("e1", "w1") as lock:
                    with Client(path) as thief:
                        await anyio.to_thread.run_sync(hand_over_and_take, path, thief)
                    assert not lock.lost
            assert raised.value.reason == "not_owner"

    run(scenario)


def test_async_block_error_wins_and_notes_the_loss(run: Runner, path: str) -> None:
    """A block that raises keeps its own exception; a note says the lock was lost."""

    async def scenario() -> None:
        async with AsyncClient(path) as c, AsyncClient(path) as other:
            with pytest.raises(KeyError) as raised:
                async with c.execute_with_lock("e1", "w1"):
                    await other.unlock_workflow_execution("e1", "w1")
                    raise KeyError("mine")
            assert any("was lost" in note for note in raised.value.__notes__)

    run(scenario)


# -- through an in-process daemon whose extensions fail (fail-closed, Redis gone) ---------


@pytest.fixture
async def failing_daemon(
    nursery: trio.Nursery, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Daemon]:
    """A daemon on memory whose lock extensions answer UNAVAILABLE, as in an outage."""
    daemon = Daemon(Config(socket=sock_path, cleanup_interval=0), clock=ManualClock())

    async def extend(execution_id: str, worker_id: str, ttl: float) -> LockStatus:
        raise Unavailable("Redis is unreachable and locks fail closed")

    monkeypatch.setattr(daemon.locks, "extend", extend)
    await nursery.start(daemon.run)
    yield daemon
    daemon.shutdown()


#: A TTL short enough that its expiry comes soon, long enough for a loaded host.
SHORT_TTL = 1.0


async def test_async_client_hears_of_a_lock_the_outage_took(
    failing_daemon: Daemon, sock_path: str
) -> None:
    """The keepalive gives the lock up before its TTL; the trio client is told (expired)."""
    async with AsyncClient(sock_path) as c:
        told = trio.Event()
        with pytest.raises(LockLost) as raised:
            async with c.execute_with_lock("e1", "w1", SHORT_TTL, on_lost=lambda _: told.set()):
                took = trio.current_time()
                with trio.fail_after(10):
                    await told.wait()
                assert trio.current_time() - took < SHORT_TTL
        assert raised.value.reason == "expired"
    assert failing_daemon.holds.kept == 0


async def test_sync_client_hears_of_a_lock_the_outage_took(
    failing_daemon: Daemon, sock_path: str
) -> None:
    """The same for the sync client, in a thread: lock.lost turns true, then LockLost."""

    def work() -> str:
        with Client(sock_path) as c:
            with (
                pytest.raises(LockLost) as raised,
                c.execute_with_lock("e1", "w1", SHORT_TTL) as lock,
            ):
                wait_until(lambda: lock.lost, 10, "lock.lost")
            return raised.value.reason

    assert await trio.to_thread.run_sync(work) == "expired"


async def test_kept_locks_are_marked_volatile(autojump_clock: trio.testing.MockClock) -> None:
    """A durable store is told which locks are kept alive (forgotten at restart); plain ones not."""
    clock, keys = TrioClock(), KeySpace("wks:")
    store = MemoryStore(clock=clock)
    marked: list[str] = []
    service = Holds(Locks(store, keys, clock), store, keys, mark_volatile=marked.append)
    async with trio.open_nursery() as nursery:
        await nursery.start(service.run)
        await service.acquire(FakeSession(1), "kept", "w1", 30, True, 0)
        await service.acquire(FakeSession(1), "plain", "w1", 30, False, 0)
        assert marked == [keys.lock("kept")]
        nursery.cancel_scope.cancel()


def test_fail_closed_keepalive_through_a_frozen_redis_is_given_up_in_time(
    sock_path: str, redis_server: RedisServer
) -> None:
    """A real outage, fail-closed: the holder is told before the expiry Redis last
    confirmed, so another daemon granting the lock once Redis runs again never
    overlaps it."""
    env = {
        "REDIS_ENABLED": "1",
        "REDIS_URL": redis_server.url,
        "WKSD_REDIS_TIMEOUT": "0.25",
        "WKSD_LOCKS_FAIL_CLOSED": "1",
    }
    daemon = DaemonProcess(sock_path, env).start()
    other = DaemonProcess(sock_path + ".2", env).start()
    try:
        with Client(sock_path) as probe:
            wait_until(lambda: probe.health().backend == "redis", what="redis serving")
        with Client(sock_path) as holder, Client(sock_path + ".2") as rival:
            ttl = 3.0
            lock = holder.acquire_lock("e1", "w1", ttl=ttl, keepalive=True)
            assert lock.acquired
            redis_server.pause()
            paused = time.monotonic()
            try:
                with pytest.raises(Unavailable):  # no daemon grants it meanwhile
                    rival.acquire_lock("e1", "w2", ttl=ttl)
                # No extension reaches Redis from here: its copy expires at most
                # ``ttl`` after the pause began (the last one was earlier still).
                wait_until(lambda: lock.lost, timeout=2 * ttl, what="lock.lost")
                told = time.monotonic()
            finally:
                redis_server.resume()
            assert lock.lost_reason == "expired"
            assert told < paused + ttl

            def rival_takes_it() -> bool:
                try:
                    return rival.acquire_lock("e1", "w2", ttl=ttl).acquired
                except Unavailable:  # its daemon has not reconnected yet
                    return False

            wait_until(
                rival_takes_it,
                timeout=4 * ttl,
                what="the rival to get the lock",
            )
    finally:
        other.close()
        daemon.close()
