"""The async client (clientlib._async) under trio and under asyncio.

Each test is a scenario written once against anyio and run on both event
loops by the ``run`` fixture (``anyio.run`` with either backend), against
the real daemon binary or a fake daemon in a thread.
"""

from __future__ import annotations

import contextlib
import inspect
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from clientlib import (
    AsyncClient,
    BadRequest,
    CleanupResult,
    Client,
    Conflict,
    ConnectionLost,
    DaemonUnavailable,
    LockHeld,
    LockResult,
    LockStatus,
    NotFound,
    ProtocolError,
    RemoteError,
    RequestTimeout,
    UnknownMethod,
    WorkflowEvent,
    WorkflowState,
    WorkflowStats,
    cache_key,
)
from clientlib._async import _DISCONNECTED
from clientlib.protocol import (
    Decoder,
    encode_notification,
    encode_response,
)

from .fakes import FakeDaemon, answer, fake_daemons, read_requests  # noqa: F401 (the fixture)
from .polling import await_until
from .processes import DaemonProcess

Scenario = Callable[[], Awaitable[None]]
Runner = Callable[[Scenario], None]


@pytest.fixture(params=["trio", "asyncio"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Run a scenario to completion on the parametrised event loop."""

    def runner(scenario: Scenario) -> None:
        anyio.run(scenario, backend=request.param)

    return runner


@pytest.fixture
def path(daemon_process: DaemonProcess) -> str:
    return daemon_process.path


def accepted_connections(metrics_text: str) -> float:
    """The daemon's wksd_connections_accepted_total, from the Prometheus text."""
    for line in metrics_text.splitlines():
        if line.startswith("wksd_connections_accepted_total "):
            return float(line.split()[1])
    raise AssertionError("wksd_connections_accepted_total is missing")


# -- every kind of method, against the real daemon ---------------------------


def test_sessions_through_the_async_client(run: Runner, path: str) -> None:
    """set/get/touch/delete a session, awaited."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            assert await c.ping() == "PONG"
            assert await c.set_session("user123", {"role": "admin"}, ttl=60) is True
            assert await c.get_session("user123") == {"role": "admin"}
            assert await c.touch_session("user123", ttl=120) is True
            assert await c.delete_session("user123") is True
            assert await c.get_session("user123") is None
            assert await c.delete_session("user123") is False

    run(scenario)


def test_workflows_through_the_async_client(run: Runner, path: str) -> None:
    """The workflow methods return the same typed results as the sync client's."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            state = await c.start_workflow_tracking("exec-1", "wf", 5, {"userId": "u"})
            assert isinstance(state, WorkflowState) and state.current_step == "initializing"
            state = await c.update_workflow_progress("exec-1", 2, "Processing", {"n": 100})
            assert state.progress == 40 and state.data == {"userId": "u", "n": 100}
            assert await c.active_workflows() == ["exec-1"]
            assert [s.execution_id for s in await c.active_workflows_detailed()] == ["exec-1"]
            stats = await c.workflow_stats()
            assert isinstance(stats, WorkflowStats) and stats.executions_by_status["running"] == 1
            done = await c.complete_workflow_tracking("exec-1", "completed", None, {"total": 5})
            assert done.finished and done.progress == 100
            assert await c.fetch_workflow_state("exec-1") == done
            assert await c.fetch_workflow_state("nope") is None
            assert await c.cleanup_workflows() == CleanupResult(cleaned=0, errors=0)

    run(scenario)


def test_locks_through_the_async_client(run: Runner, path: str) -> None:
    """lock/unlock return bools, acquire_lock the fencing token, status is typed."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            assert await c.lock_workflow_execution("e1", "worker-1") is True
            assert await c.lock_workflow_execution("e1", "worker-2") is False
            status = await c.is_workflow_locked("e1")
            assert isinstance(status, LockStatus) and status.worker_id == "worker-1"
            assert await c.extend_workflow_lock("e1", "worker-1", ttl=600) is True
            assert await c.unlock_workflow_execution("e1", "worker-2") is False
            assert await c.unlock_workflow_execution("e1", "worker-1") is True
            lock = await c.acquire_lock("e1", "worker-3", ttl=30)
            assert isinstance(lock, LockResult) and lock and lock.fencing_token is not None
            refused = await c.acquire_lock("e1", "worker-4")
            assert not refused and refused.worker_id == "worker-3"

    run(scenario)


def test_cache_health_metrics_and_call(run: Runner, path: str) -> None:
    """The cache methods, health, metrics and call() give what the sync client gives."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            key = cache_key({"q": "x", "page": 2})
            assert await c.get_cached_api_response(key) is None
            assert await c.cache_api_response(key, {"items": [1, 2]}, ttl=60) is True
            assert await c.get_cached_api_response(key) == {"items": [1, 2]}
            assert await c.delete_cached_api_response(key) is True
            health = await c.health()
            assert health.status == "healthy" and health.backend == "memory"
            assert "wksd_requests_total" in await c.metrics()
            assert await c.call("ping") == "PONG"
            assert await c.call("lock.status", "e9") == {
                "locked": False,
                "workerId": None,
                "ttl": None,
            }

    run(scenario)


def parameters(function: Callable[..., Any]) -> list[tuple[str, Any, Any]]:
    """Name, kind and default of each parameter (annotations differ: Awaitable...)."""
    found = inspect.signature(function).parameters.values()
    return [(p.name, p.kind, p.default) for p in found]


def test_every_sync_method_is_an_async_method() -> None:
    """Each public method of Client exists on AsyncClient, awaitable, with the same parameters."""
    renamed = {"close": "aclose"}
    for name, member in vars(Client).items():
        if name.startswith("_") or not callable(member):
            continue
        async_member = getattr(AsyncClient, renamed.get(name, name))
        assert parameters(async_member) == parameters(member), name
        if name == "execute_with_lock":  # an async context manager
            assert inspect.isasyncgenfunction(inspect.unwrap(async_member))
        else:
            assert inspect.iscoroutinefunction(async_member), name


def test_the_shared_methods_are_real_methods_of_each_client() -> None:
    """The methods declared once (clientlib._api) are functions on Client and coroutine
    functions on AsyncClient (execute_with_lock: a context manager of each kind), with
    the same parameters and docstring, and an instance's signature as help() shows it."""
    shared = [name for name in dir(Client) if not name.startswith("_") and name not in vars(Client)]
    assert {"ping", "acquire_lock", "execute_with_lock", "get_or_compute", "call"} <= set(shared)
    for name in shared:
        member, async_member = getattr(Client, name), getattr(AsyncClient, name)
        assert parameters(async_member) == parameters(member), name
        assert async_member.__doc__ == member.__doc__, name
        assert not inspect.iscoroutinefunction(member), name
        assert inspect.iscoroutinefunction(async_member) is (name != "execute_with_lock"), name
    client = Client("/nonexistent/wksd.sock")
    assert str(inspect.signature(client.touch_session)) == "(user_id: 'str', ttl: 'float' = 86400)"
    assert str(inspect.signature(client.ping)) == "()"
    block = client.execute_with_lock("e1", "w1")
    assert hasattr(block, "__enter__") and not hasattr(block, "__aenter__")
    async_block = AsyncClient("/nonexistent/wksd.sock").execute_with_lock("e1", "w1")
    assert hasattr(async_block, "__aenter__") and not hasattr(async_block, "__enter__")


@pytest.mark.parametrize(
    ("method", "params", "error"),
    [
        ("workflow.update", ["missing", 1, "s"], NotFound),
        ("no.such", [], UnknownMethod),
        ("session.set", ["", {}], BadRequest),
        ("session.get", ["a", "b"], BadRequest),
    ],
)
def test_wire_errors_become_their_exceptions(
    run: Runner, path: str, method: str, params: list[Any], error: type[RemoteError]
) -> None:
    """Each wire code raises its named subclass, with code and message."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            with pytest.raises(error) as caught:
                await c.call(method, *params)
            assert caught.value.code == error.code and caught.value.message
            await c.start_workflow_tracking("e", "w", 2)
            with pytest.raises(Conflict):
                await c.start_workflow_tracking("e", "w", 2)
            assert await c.ping() == "PONG"  # the connection is still good

    run(scenario)


def test_concurrent_calls_share_one_connection(run: Runner, path: str) -> None:
    """200 tasks calling at once each get their own answer, over one connection."""

    async def scenario() -> None:
        # The daemon counts a connection when its handler first runs: one
        # accepted together with the first client's (the fixture's start-up
        # probe) may not be counted yet on that one. A second one sees both.
        with Client(path) as first:
            first.ping()
        with Client(path) as second:
            before = accepted_connections(second.metrics())
        results: dict[int, Any] = {}

        async def work(c: AsyncClient, index: int) -> None:
            await c.cache_api_response(f"key-{index}", {"index": index}, ttl=60)
            results[index] = await c.get_cached_api_response(f"key-{index}")

        async with AsyncClient(path) as c:
            async with anyio.create_task_group() as tasks:
                for index in range(200):
                    tasks.start_soon(work, c, index)
            after = accepted_connections(await c.metrics())
        assert results == {index: {"index": index} for index in range(200)}
        assert after == before + 1

    run(scenario)


# -- lock helper -------------------------------------------------------------


def test_execute_with_lock_releases_after_success(run: Runner, path: str) -> None:
    """The lock is held inside the block, with its token, and released after."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            async with c.execute_with_lock("e1", "w1") as lock:
                assert lock.fencing_token is not None
                assert (await c.is_workflow_locked("e1")).worker_id == "w1"
            assert not (await c.is_workflow_locked("e1")).locked

    run(scenario)


def test_execute_with_lock_releases_after_an_error(run: Runner, path: str) -> None:
    """An exception in the block propagates as itself and the lock is released."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            with pytest.raises(ZeroDivisionError):
                async with c.execute_with_lock("e1", "w1"):
                    raise ZeroDivisionError
            assert not (await c.is_workflow_locked("e1")).locked

    run(scenario)


def test_execute_with_lock_releases_when_cancelled(run: Runner, path: str) -> None:
    """A block cancelled from outside still releases the lock."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            with anyio.CancelScope() as scope:
                async with c.execute_with_lock("e1", "w1"):
                    scope.cancel()
                    await anyio.sleep_forever()
            assert scope.cancelled_caught
            assert not (await c.is_workflow_locked("e1")).locked

    run(scenario)


def test_execute_with_lock_raises_lock_held(run: Runner, path: str) -> None:
    """When another worker holds the lock, LockHeld names it and the block never runs."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            await c.lock_workflow_execution("e1", "other")
            ran = False
            with pytest.raises(LockHeld, match="other"):
                async with c.execute_with_lock("e1", "w1"):
                    ran = True
            assert not ran
            assert (await c.is_workflow_locked("e1")).worker_id == "other"

    run(scenario)


def test_execute_with_lock_keeps_the_lock_alive_with_the_connection(run: Runner, path: str) -> None:
    """The block's lock is a keepalive one: it goes when the client's connection closes."""

    async def scenario() -> None:
        async with AsyncClient(path) as watcher, AsyncClient(path) as c:
            with pytest.raises(ConnectionLost):  # the release, on a closed client
                async with c.execute_with_lock("e1", "w1", ttl=60):
                    assert (await watcher.is_workflow_locked("e1")).worker_id == "w1"
                    await c.aclose()  # the connection goes, as when a worker dies

            # The daemon notices the hang-up on its own time: poll with a deadline.
            async def released() -> bool:
                return not (await watcher.is_workflow_locked("e1")).locked

            await await_until(released, what="the keepalive lock's release")

    run(scenario)


def test_execute_with_lock_waits_for_a_lock_when_asked(run: Runner, path: str) -> None:
    """With wait, the block starts once the other holder releases, instead of LockHeld."""

    async def scenario() -> None:
        async with AsyncClient(path) as c, anyio.create_task_group() as tasks:
            await c.lock_workflow_execution("e1", "other")
            asking, entered = anyio.Event(), anyio.Event()

            async def worker() -> None:
                asking.set()
                async with c.execute_with_lock("e1", "w1", wait=5) as lock:
                    assert lock.worker_id == "w1"
                    entered.set()

            tasks.start_soon(worker)
            await asking.wait()  # the acquire goes out before the ping below
            # It waits at the daemon; other calls on the connection still pass.
            assert await c.ping() == "PONG"
            assert not entered.is_set()
            assert await c.unlock_workflow_execution("e1", "other") is True
            with anyio.fail_after(5):
                await entered.wait()

    run(scenario)


def test_get_or_compute_computes_once(run: Runner, path: str) -> None:
    """Concurrent callers of one key get one computation's value; then it is cached."""

    async def scenario() -> None:
        calls = 0
        results: list[Any] = []

        async def compute() -> dict[str, int]:
            nonlocal calls
            calls += 1
            await anyio.lowlevel.checkpoint()  # let the other callers ask meanwhile
            return {"answer": 42}

        async def get(c: AsyncClient) -> None:
            results.append(await c.get_or_compute("report", compute, ttl=60))

        async with AsyncClient(path) as c:
            async with anyio.create_task_group() as tasks:
                for _ in range(5):
                    tasks.start_soon(get, c)
            assert results == [{"answer": 42}] * 5 and calls == 1
            assert await c.get_cached_api_response("report") == {"answer": 42}

    run(scenario)


def test_get_or_compute_caches_nothing_when_fn_fails(run: Runner, path: str) -> None:
    """fn's exception reaches its caller and nothing is cached."""

    async def scenario() -> None:
        async def fail() -> None:
            raise ValueError("no data")

        async with AsyncClient(path) as c:
            with pytest.raises(ValueError, match="no data"):
                await c.get_or_compute("report", fail)
            assert await c.get_cached_api_response("report") is None
            assert await c.get_or_compute("report", _forty_two) == 42

    run(scenario)


async def _forty_two() -> int:
    return 42


def test_block_error_wins_over_a_failed_release(run: Runner, daemon_process: DaemonProcess) -> None:
    """If the daemon vanishes inside the block, the block's own error is the one raised."""

    async def scenario() -> None:
        async with AsyncClient(daemon_process.path, timeout=2) as c:
            with pytest.raises(KeyError):
                async with c.execute_with_lock("e1", "w1"):
                    await anyio.to_thread.run_sync(daemon_process.stop)
                    raise KeyError("mine")

    run(scenario)


# -- the client's own life: reconnects, closing, misuse ----------------------


def test_client_reconnects_after_a_daemon_restart(
    run: Runner, daemon_process: DaemonProcess
) -> None:
    """A client whose daemon restarts carries on with no error."""

    async def scenario() -> None:
        async with AsyncClient(daemon_process.path) as c:
            assert await c.ping() == "PONG"
            await anyio.to_thread.run_sync(daemon_process.stop)
            await anyio.to_thread.run_sync(daemon_process.start)
            assert await c.ping() == "PONG"
            assert await c.set_session("u", {"after": "restart"}) is True

    run(scenario)


def test_unavailable_daemon_is_daemon_unavailable(run: Runner, sock_path: str) -> None:
    """No daemon on the path raises DaemonUnavailable naming the path."""

    async def scenario() -> None:
        async with AsyncClient(sock_path) as c:
            with pytest.raises(DaemonUnavailable, match=sock_path):
                await c.ping()

    run(scenario)


def test_a_client_must_be_entered_and_is_done_after_aclose(run: Runner, path: str) -> None:
    """A call outside ``async with`` is a RuntimeError; after aclose, ConnectionLost."""

    async def scenario() -> None:
        c = AsyncClient(path)
        with pytest.raises(RuntimeError, match="async with"):
            await c.ping()
        async with c:
            assert await c.ping() == "PONG"
            await c.aclose()
            with pytest.raises(ConnectionLost, match="closed"):
                await c.ping()

    run(scenario)


def test_the_block_error_is_not_wrapped(run: Runner, path: str) -> None:
    """An exception raised in the client's block comes out as itself, not in a group."""

    async def scenario() -> None:
        with pytest.raises(KeyError):
            async with AsyncClient(path) as c:
                await c.ping()
                raise KeyError("mine")

    run(scenario)


# -- a fake daemon, for what the real one never does -------------------------


def test_silent_daemon_is_a_request_timeout(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """No answer within the timeout raises RequestTimeout."""
    fake(lambda conn, decoder: read_requests(conn, decoder, 1))

    async def scenario() -> None:
        async with AsyncClient(sock_path, timeout=0.3) as c:
            with pytest.raises(RequestTimeout):
                await c.ping()

    run(scenario)


def test_a_late_answer_is_dropped(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """The answer to a call that timed out never reaches the next call."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        first, second = read_requests(conn, decoder, 2)  # the second comes after the timeout
        answer(conn, first, "late")
        answer(conn, second, "mine")

    fake(behave)

    async def scenario() -> None:
        async with AsyncClient(sock_path, timeout=0.3) as c:
            with pytest.raises(RequestTimeout):
                await c.call("first")
            assert await c.call("second") == "mine"

    run(scenario)


def test_daemon_closing_mid_request_is_connection_lost(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """Every call waiting on a connection the daemon closes raises ConnectionLost."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        read_requests(conn, decoder, 3)
        conn.shutdown(socket.SHUT_RDWR)

    fake(behave)

    async def scenario() -> None:
        failures: list[BaseException] = []

        async def call(c: AsyncClient) -> None:
            try:
                await c.ping()
            except ConnectionLost as exc:
                failures.append(exc)

        async with AsyncClient(sock_path) as c, anyio.create_task_group() as tasks:
            for _ in range(3):
                tasks.start_soon(call, c)
        assert len(failures) == 3

    run(scenario)


def test_closing_notice_moves_new_calls_to_a_new_connection(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """After a closing notice, no request goes out on that connection; a new one takes them."""
    old: list[socket.socket] = []
    sent_after_notice: list[bytes] = []

    def closing(conn: socket.socket, decoder: Decoder) -> None:
        (request,) = read_requests(conn, decoder, 1)
        conn.sendall(encode_response(request.msgid, None, "old"))
        conn.sendall(encode_notification("closing", ["shutdown"]))
        old.append(conn)

    def fresh(conn: socket.socket, decoder: Decoder) -> None:
        (request,) = read_requests(conn, decoder, 1)
        # The client chose this connection for the request: anything it had
        # sent on the old one is there by now.
        old[0].setblocking(False)
        with contextlib.suppress(BlockingIOError):  # nothing there: right
            sent_after_notice.append(old[0].recv(65536))
        answer(conn, request, "new")

    daemon = fake(closing, fresh)

    async def scenario() -> None:
        async with AsyncClient(sock_path) as c:
            assert await c.call("one") == "old"
            assert await c.call("two") == "new"
        assert daemon.connections == 2

    run(scenario)
    assert sent_after_notice in ([], [b""])  # nothing, or the client's hang-up


def test_protocol_error_notice_is_raised(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """The daemon's protocol_error notification becomes ProtocolError with its text."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        read_requests(conn, decoder, 1)
        conn.sendall(encode_notification("protocol_error", ["too big"]))

    fake(behave)

    async def scenario() -> None:
        async with AsyncClient(sock_path) as c:
            with pytest.raises(ProtocolError, match="too big"):
                await c.ping()

    run(scenario)


def test_garbage_from_the_daemon_is_a_protocol_error(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """Bytes that are not msgpack raise ProtocolError."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        read_requests(conn, decoder, 1)
        conn.sendall(b"\xc1\xc1")

    fake(behave)

    async def scenario() -> None:
        async with AsyncClient(sock_path) as c:
            with pytest.raises(ProtocolError):
                await c.ping()

    run(scenario)


def test_notifications_reach_their_listeners(
    run: Runner, sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """A notification goes to the listeners of its method; unknown ones are ignored."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        (request,) = read_requests(conn, decoder, 1)
        conn.sendall(encode_notification("no.listener", [1]))
        conn.sendall(encode_notification("workflow.event", [{"executionId": "e1"}]))
        answer(conn, request, "subscribed")
        read_requests(conn, decoder, 1)  # until the client hangs up
        conn.shutdown(socket.SHUT_RDWR)

    fake(behave)

    async def scenario() -> None:
        async with AsyncClient(sock_path) as c:
            with c._listen("workflow.event") as events, c._listen(_DISCONNECTED) as ends:
                assert await c.call("workflow.subscribe") == "subscribed"
                assert await events.receive() == [{"executionId": "e1"}]
                with pytest.raises(ConnectionLost):
                    await c.ping()  # the fake hangs up instead of answering
                assert "closed" in (await ends.receive())[0]

    run(scenario)


# -- import cost -------------------------------------------------------------


def test_async_client_is_imported_only_when_asked_for() -> None:
    """`import clientlib` loads no event loop; `clientlib.AsyncClient` then loads anyio."""
    code = (
        "import sys, clientlib\n"
        "loops = ('anyio', 'asyncio', 'trio', 'sniffio')\n"
        "print([m for m in loops if m in sys.modules])\n"
        "clientlib.AsyncClient\n"
        "print('anyio' in sys.modules, 'wksd' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.split("\n")[:2] == ["[]", "True False"]


# -- workflow subscriptions ---------------------------------------------------


def test_subscriptions_deliver_events(run: Runner, path: str) -> None:
    """An async subscription yields every change; one to an id yields that id's only."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            every = await c.subscribe_workflows()
            mine = await c.subscribe_workflows("mine")
            await c.start_workflow_tracking("other", "w", 2)
            await c.start_workflow_tracking("mine", "w", 2)
            await c.complete_workflow_tracking("mine", "completed")
            with anyio.fail_after(10):
                seen = [await anext(every) for _ in range(3)]
                own = [await anext(mine) for _ in range(2)]
            assert [(e.execution_id, e.type) for e in seen] == [
                ("other", "started"),
                ("mine", "started"),
                ("mine", "completed"),
            ]
            assert [e.type for e in own] == ["started", "completed"]
            assert isinstance(own[1], WorkflowEvent) and own[1].state.progress == 100
            await every.aclose()
            await mine.aclose()
            assert "wksd_workflow_subscriptions 0.0" in await c.metrics()

    run(scenario)


def test_two_subscriptions_to_the_same_id_share_one(run: Runner, path: str) -> None:
    """Closing one of two subscriptions to the same id keeps the other working."""

    async def scenario() -> None:
        async with AsyncClient(path) as c:
            first = await c.subscribe_workflows("e1")
            second = await c.subscribe_workflows("e1")
            await first.aclose()
            await c.start_workflow_tracking("e1", "w", 2)
            with anyio.fail_after(10):
                assert (await anext(second)).execution_id == "e1"
            async with second:
                pass
            assert "wksd_workflow_subscriptions 0.0" in await c.metrics()

    run(scenario)


def test_a_subscription_follows_a_daemon_restart(
    run: Runner, daemon_process: DaemonProcess
) -> None:
    """After the daemon restarts, the subscription subscribes again and events flow."""

    async def scenario() -> None:
        async with AsyncClient(daemon_process.path) as c:
            events = await c.subscribe_workflows()
            await anyio.to_thread.run_sync(daemon_process.stop)
            await anyio.to_thread.run_sync(daemon_process.start)

            async def change_once_resubscribed() -> None:
                # a counter, not an event: poll with a deadline
                await await_until(lambda: events.resubscribed > 0, what="resubscribed")
                await c.start_workflow_tracking("after", "w", 2)

            async with anyio.create_task_group() as tasks:
                tasks.start_soon(change_once_resubscribed)
                with anyio.fail_after(10):
                    assert (await anext(events)).execution_id == "after"
            await events.aclose()

    run(scenario)
