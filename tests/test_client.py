"""The sync client against the real daemon binary (clientlib._sync)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import clientlib
from clientlib import (
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
    WorkflowState,
    WorkflowStats,
    cache_key,
    resolve_socket_path,
)
from clientlib._paths import SYSTEM_SOCKET
from clientlib.protocol import Decoder, encode_notification, encode_response

from .fakes import FakeDaemon, answer, fake_daemons, read_requests  # noqa: F401 (the fixture)
from .processes import DaemonProcess


@pytest.fixture
def client(daemon_process: DaemonProcess) -> Iterator[Client]:
    with Client(daemon_process.path, timeout=5) as c:
        yield c


def test_sessions_through_the_client(client: Client) -> None:
    """set/get/touch/delete a session with the seed's names."""
    assert client.ping() == "PONG"
    assert client.set_session("user123", {"role": "admin"}, ttl=60) is True
    assert client.get_session("user123") == {"role": "admin"}
    assert client.touch_session("user123", ttl=120) is True
    assert client.delete_session("user123") is True
    assert client.get_session("user123") is None
    assert client.delete_session("user123") is False


def test_workflows_through_the_client(client: Client) -> None:
    """The workflow methods return typed snake_case results."""
    state = client.start_workflow_tracking("exec-123", "workflow-456", 5, {"userId": "u"})
    assert isinstance(state, WorkflowState) and state.current_step == "initializing"
    state = client.update_workflow_progress("exec-123", 2, "Processing data", {"n": 100})
    assert state.progress == 40 and state.completed_steps == 2
    assert state.estimated_completion is not None and state.data == {"userId": "u", "n": 100}
    assert client.active_workflows() == ["exec-123"]
    assert [s.execution_id for s in client.active_workflows_detailed()] == ["exec-123"]
    stats = client.workflow_stats()
    assert isinstance(stats, WorkflowStats) and stats.executions_by_status["running"] == 1
    done = client.complete_workflow_tracking("exec-123", "completed", None, {"total": 500})
    assert done.finished and done.progress == 100 and done.completed_at is not None
    fetched = client.fetch_workflow_state("exec-123")
    assert fetched == done
    assert client.fetch_workflow_state("nope") is None
    assert client.cleanup_workflows() == CleanupResult(cleaned=0, errors=0)


def test_locks_through_the_client(client: Client) -> None:
    """lock/unlock return bools; acquire_lock gives the token; status is typed."""
    assert client.lock_workflow_execution("e1", "worker-1") is True
    assert client.lock_workflow_execution("e1", "worker-2") is False
    status = client.is_workflow_locked("e1")
    assert isinstance(status, LockStatus) and status.locked and status.worker_id == "worker-1"
    assert client.extend_workflow_lock("e1", "worker-1", ttl=600) is True
    assert client.unlock_workflow_execution("e1", "worker-2") is False
    assert client.unlock_workflow_execution("e1", "worker-1") is True
    lock = client.acquire_lock("e1", "worker-3", ttl=30)
    assert isinstance(lock, LockResult) and lock and lock.fencing_token is not None
    refused = client.acquire_lock("e1", "worker-4")
    assert not refused and refused.worker_id == "worker-3" and refused.fencing_token is None


def test_cache_through_the_client(client: Client) -> None:
    """API responses are cached under cache_key(params)."""
    key = cache_key({"q": "x", "page": 2})
    assert client.get_cached_api_response(key) is None
    assert client.cache_api_response(key, {"items": [1, 2]}, ttl=60) is True
    assert client.get_cached_api_response(key) == {"items": [1, 2]}
    assert client.delete_cached_api_response(key) is True


def test_health_and_metrics_through_the_client(client: Client) -> None:
    """health is typed; metrics is the Prometheus text."""
    health = client.health()
    assert health.status == "healthy" and health.backend == "memory"
    assert health.redis_status == "disabled"
    assert "wksd_requests_total" in client.metrics()


def test_call_reaches_any_method(client: Client) -> None:
    """call() sends any method and returns the raw result."""
    assert client.call("ping") == "PONG"
    assert client.call("lock.status", "e9") == {"locked": False, "workerId": None, "ttl": None}


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.update_workflow_progress("missing", 1, "s"), NotFound),
        (lambda c: c.call("no.such"), UnknownMethod),
        (lambda c: c.set_session("", {}), BadRequest),
        (lambda c: c.call("session.get", "a", "b"), BadRequest),
    ],
)
def test_wire_errors_become_their_exceptions(
    client: Client, call: Callable[[Client], object], error: type[RemoteError]
) -> None:
    """Each wire code raises its named subclass, with code and message."""
    with pytest.raises(error) as caught:
        call(client)
    assert caught.value.code == error.code and caught.value.message


def test_conflict_on_double_start(client: Client) -> None:
    """Starting an active workflow twice raises Conflict."""
    client.start_workflow_tracking("e", "w", 2)
    with pytest.raises(Conflict):
        client.start_workflow_tracking("e", "w", 2)


def test_execute_with_lock_releases_after_success(client: Client) -> None:
    """The lock is held inside the block, with its token, and released after."""
    with client.execute_with_lock("e1", "w1") as lock:
        assert lock.fencing_token is not None
        assert client.is_workflow_locked("e1").worker_id == "w1"
    assert not client.is_workflow_locked("e1").locked


def test_execute_with_lock_releases_after_an_error(client: Client) -> None:
    """An exception in the block propagates and the lock is still released."""
    with pytest.raises(ZeroDivisionError), client.execute_with_lock("e1", "w1"):
        raise ZeroDivisionError
    assert not client.is_workflow_locked("e1").locked


def test_execute_with_lock_raises_lock_held(client: Client) -> None:
    """When another worker holds the lock, LockHeld names it and the block never runs."""
    client.lock_workflow_execution("e1", "other")
    ran = False
    with pytest.raises(LockHeld, match="other"), client.execute_with_lock("e1", "w1"):
        ran = True
    assert not ran
    assert client.is_workflow_locked("e1").worker_id == "other"


def test_block_error_wins_over_a_failed_release(daemon_process: DaemonProcess) -> None:
    """If the daemon vanishes inside the block, the block's own error is the one raised."""
    c = Client(daemon_process.path, timeout=2)
    with c, pytest.raises(KeyError), c.execute_with_lock("e1", "w1"):
        daemon_process.stop()
        raise KeyError("mine")


def test_client_reconnects_after_a_daemon_restart(daemon_process: DaemonProcess) -> None:
    """A client connected to a daemon that restarts carries on with no error."""
    with Client(daemon_process.path) as c:
        assert c.ping() == "PONG"
        daemon_process.stop()
        daemon_process.start()
        assert c.ping() == "PONG"
        assert c.set_session("u", {"after": "restart"}) is True


def test_unavailable_daemon_is_daemon_unavailable(sock_path: str) -> None:
    """No daemon on the path raises DaemonUnavailable naming the path."""
    with Client(sock_path) as c, pytest.raises(DaemonUnavailable, match=sock_path):
        c.ping()


def test_silent_daemon_is_a_request_timeout(
    sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """No answer within the timeout raises RequestTimeout."""
    fake(lambda conn, decoder: read_requests(conn, decoder, 1))
    with Client(sock_path, timeout=0.3) as c, pytest.raises(RequestTimeout):
        c.ping()


def test_connection_dropped_mid_request_is_connection_lost(
    sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """A daemon that reads the request and closes raises ConnectionLost (not retried)."""
    fake(lambda conn, decoder: (read_requests(conn, decoder, 1), conn.shutdown(socket.SHUT_RDWR)))
    with Client(sock_path) as c, pytest.raises(ConnectionLost):
        c.ping()


def test_garbage_from_the_daemon_is_a_protocol_error(
    sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """Bytes that are not msgpack raise ProtocolError."""
    fake(lambda conn, decoder: (read_requests(conn, decoder, 1), conn.sendall(b"\xc1\xc1")))
    with Client(sock_path) as c, pytest.raises(ProtocolError):
        c.ping()


def test_protocol_error_notice_is_raised(sock_path: str, fake: Callable[..., FakeDaemon]) -> None:
    """The daemon's protocol_error notification becomes ProtocolError with its text."""
    fake(
        lambda conn, decoder: (
            read_requests(conn, decoder, 1),
            conn.sendall(encode_notification("protocol_error", ["too big"])),
        )
    )
    with Client(sock_path) as c, pytest.raises(ProtocolError, match="too big"):
        c.ping()


def test_a_late_answer_is_dropped(sock_path: str, fake: Callable[..., FakeDaemon]) -> None:
    """The answer to a call that timed out never reaches the next call."""

    def behave(conn: socket.socket, decoder: Decoder) -> None:
        first, second = read_requests(conn, decoder, 2)  # the second comes after the timeout
        answer(conn, first, "late")
        answer(conn, second, "mine")

    fake(behave)
    with Client(sock_path, timeout=0.3) as c:
        with pytest.raises(RequestTimeout):
            c.call("first")
        assert c.call("second") == "mine"


def test_closing_notice_moves_the_next_call_to_a_new_connection(
    sock_path: str, fake: Callable[..., FakeDaemon]
) -> None:
    """After the answer that came with a closing notice, the next call connects afresh."""

    def closing(conn: socket.socket, decoder: Decoder) -> None:
        (request,) = read_requests(conn, decoder, 1)
        old = encode_response(request.msgid, None, "old")
        conn.sendall(old + encode_notification("closing", ["shutdown"]))

    def fresh(conn: socket.socket, decoder: Decoder) -> None:
        (request,) = read_requests(conn, decoder, 1)
        answer(conn, request, "new")

    daemon = fake(closing, fresh)
    with Client(sock_path) as c:
        assert c.call("one") == "old"
        assert c.call("two") == "new"
    assert daemon.connections == 2


def test_one_client_shared_by_threads(client: Client) -> None:
    """Eight threads on one Client each get their own answers."""
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            for round_ in range(50):
                client.set_session(f"u{index}", {"r": round_})
                assert client.get_session(f"u{index}") == {"r": round_}
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_cache_key_is_md5_of_json_stringify() -> None:
    """cache_key: md5 hex of JSON.stringify's text, keys as inserted (tests/test_cache_key.py)."""
    stringified = '{"b":"é","a":[1,{"d":2,"c":3}]}'
    assert (
        cache_key({"b": "é", "a": [1, {"d": 2, "c": 3}]})
        == hashlib.md5(stringified.encode()).hexdigest()
    )
    assert cache_key({"x": 1, "y": 2}) != cache_key({"y": 2, "x": 1})
    assert clientlib.canonical_cache_key({"x": 1, "y": 2}) == clientlib.canonical_cache_key(
        {"y": 2, "x": 1}
    )


def test_socket_path_resolution(tmp_path: os.PathLike[str]) -> None:
    """Explicit path, then $WKSD_SOCKET, then the first default socket that exists."""
    present: set[str] = set()  # the sockets that exist, whatever this host's /run holds
    exists = present.__contains__
    assert resolve_socket_path("/x.sock", {}, exists=exists) == "/x.sock"
    assert resolve_socket_path(None, {"WKSD_SOCKET": "/y.sock"}, exists=exists) == "/y.sock"
    env = {"RUNTIME_DIRECTORY": "/nonexistent-rt", "XDG_RUNTIME_DIR": str(tmp_path)}
    assert resolve_socket_path(None, env, exists=exists) == "/nonexistent-rt/wksd.sock"
    present.add(os.path.join(tmp_path, "wksd", "wksd.sock"))
    assert resolve_socket_path(None, env, exists=exists) == os.path.join(
        tmp_path, "wksd", "wksd.sock"
    )


def test_a_worker_with_a_runtime_directory_of_its_own_finds_the_system_socket() -> None:
    """A worker run by systemd has its own $RUNTIME_DIRECTORY; the system socket is found."""
    env = {"RUNTIME_DIRECTORY": "/run/my-worker"}
    assert resolve_socket_path(None, env, exists={SYSTEM_SOCKET}.__contains__) == SYSTEM_SOCKET
    assert resolve_socket_path(None, env, exists=lambda _: False) == "/run/my-worker/wksd.sock"


def test_socket_path_resolution_reads_the_real_filesystem_by_default(tmp_path: Path) -> None:
    """Without ``exists``, a socket file on disk is what counts."""
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    (tmp_path / "wksd").mkdir()
    (tmp_path / "wksd" / "wksd.sock").touch()
    assert resolve_socket_path(None, env) == str(tmp_path / "wksd" / "wksd.sock")


def test_importing_clientlib_pulls_in_no_event_loop_or_redis() -> None:
    """`import clientlib` loads msgpack and the standard library only."""
    code = (
        "import sys, clientlib; "
        "bad = [m for m in ('trio', 'redis', 'wksd', 'anyio', 'asyncio', 'hiredis') "
        "if m in sys.modules]; print(bad)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.strip() == "[]"


def test_public_surface_is_declared() -> None:
    """Everything in clientlib.__all__ exists."""
    for name in clientlib.__all__:
        assert hasattr(clientlib, name), name


def test_states_the_seed_wrote_are_typed_without_failing() -> None:
    """A zero-step run's null progress stays None, missing fields take defaults, and a
    state that is not a map (another program's) is no state."""
    from clientlib._calls import active_workflows_detailed, fetch_workflow_state

    seed = {"executionId": "e1", "status": "running", "progress": None, "totalSteps": 0}
    state = fetch_workflow_state("e1").convert(seed)
    assert state is not None and state.progress is None and state.total_steps == 0
    assert WorkflowState.from_wire({"status": "running"}).execution_id == ""
    assert fetch_workflow_state("e1").convert(["not", "a", "map"]) is None
    listed = active_workflows_detailed().convert({"workflows": [seed, "junk"], "count": 2})
    assert [s.execution_id for s in listed] == ["e1"]
