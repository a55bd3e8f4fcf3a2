"""The daemon end to end over a real Unix socket, in-process (wksd.server, wksd.app)."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import structlog
import trio
import trio.testing

from clientlib.protocol import Notification, Response, encode_request
from wksd.app import Daemon
from wksd.config import Config
from wksd.server import AddressInUse, bind_unix_socket

from .peers import Connect


async def start_daemon(nursery: trio.Nursery, path: str, **settings: Any) -> Daemon:
    daemon = Daemon(Config(socket=path, **settings))
    await nursery.start(daemon.run)
    return daemon


@pytest.fixture
async def daemon(nursery: trio.Nursery, sock_path: str) -> AsyncIterator[Daemon]:
    daemon = await start_daemon(nursery, sock_path, max_message_bytes=65536)
    yield daemon
    daemon.shutdown()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    chunks = []
    while data := await stream.receive_some(65536):
        chunks.append(data)
    return b"".join(chunks)


async def test_binary_request_gets_its_response(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """A msgpack-RPC request is answered [1, msgid, nil, result]."""
    peer = await connect()
    await peer.request(42, "ping")
    assert await peer.next() == Response(42, None, "PONG")


async def test_pipelined_requests_are_applied_in_order(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """Many requests in one write are applied in order and answered in order."""
    peer = await connect()
    batch = b"".join(
        encode_request(i, "cache.set", ["k", i, 60])
        + encode_request(10_000 + i, "cache.get", ["k"])
        for i in range(1000)
    )
    await peer.stream.send_all(batch)
    for i in range(1000):
        assert await peer.next() == Response(i, None, True)
        assert await peer.next() == Response(10_000 + i, None, i)


async def test_half_close_answers_everything_then_closes(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """After the client's EOF, every request already sent is answered, then EOF."""
    peer = await connect()
    await peer.stream.send_all(b"".join(encode_request(i, "ping", []) for i in range(300)))
    await peer.stream.send_eof()
    answers = []
    while (message := await peer.next()) is not None:
        answers.append(message.msgid)
    assert answers == list(range(300))


async def test_bad_envelope_gets_bad_request_and_the_connection_lives(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """Valid msgpack with a wrong shape is BAD_REQUEST; the next request is served."""
    peer = await connect()
    await peer.stream.send_all(msgpack.packb([0, 7, "ping", "not-a-list"]))
    bad = await peer.next()
    assert bad.msgid == 7 and bad.error["code"] == "BAD_REQUEST" and bad.result is None
    await peer.stream.send_all(msgpack.packb({"a": 1}))
    assert (await peer.next()).msgid is None
    await peer.stream.send_all(msgpack.packb([1, 3, None, "a response"]))
    assert (await peer.next()).error["code"] == "BAD_REQUEST"
    await peer.stream.send_all(msgpack.packb([2, "client.notification", []]))
    assert (await peer.call("ping")) == Response(1, None, "PONG")  # the notification: no answer


@pytest.mark.parametrize("garbage", [b"\xc1\xc1\xc1", b"\x94\x00\x01\xa4pi\xff\xfe\x90"])
async def test_garbage_closes_only_that_connection(
    daemon: Daemon, sock_path: str, garbage: bytes, connect: Connect
) -> None:
    """Undecodable bytes: earlier requests answered, protocol_error, close; others unharmed."""
    bystander = await connect()
    await bystander.request(1, "cache.set", "k", "v")
    assert (await bystander.next()).result is True
    # The bystander leaves half a request on its connection while the other breaks.
    half = encode_request(2, "cache.get", ["k"])
    await bystander.stream.send_all(half[:4])

    offender = await connect()
    await offender.stream.send_all(encode_request(5, "ping", []) + garbage)
    assert await offender.next() == Response(5, None, "PONG")
    notice = await offender.next()
    assert isinstance(notice, Notification) and notice.method == "protocol_error"
    assert await offender.next() is None

    await bystander.stream.send_all(half[4:])
    assert await bystander.next() == Response(2, None, "v")
    assert "wksd_protocol_errors_total 1.0" in daemon.metrics.render()


async def test_message_over_the_limit_closes_the_connection(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """A message over WKSD_MAX_MESSAGE_BYTES gets protocol_error and a close."""
    peer = await connect()
    await peer.request(1, "cache.set", "k", "x" * 70_000)
    notice = await peer.next()
    assert isinstance(notice, Notification) and "larger than 65536" in notice.params[0]
    assert await peer.next() is None


async def test_value_over_one_mib_is_too_large_through_the_socket(
    nursery: trio.Nursery, sock_path: str, connect: Connect
) -> None:
    """With the default message limit, a 1 MiB value fits and one byte more is TOO_LARGE."""
    await start_daemon(nursery, sock_path)
    peer = await connect()
    value = "x" * (1024 * 1024 - 2)
    assert (await peer.call("cache.set", "k", value)).result is True
    response = await peer.call("cache.set", "k2", value + "x")
    assert response.error["code"] == "TOO_LARGE"
    assert (await peer.call("cache.get", "k2")).result is None


async def test_a_client_that_does_not_read_is_not_buffered_without_bound(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """A flood from a client that reads nothing stops when the socket buffers fill; all is
    answered once it reads."""
    peer = await connect()
    request = encode_request(1, "ping", [])
    sent = 0
    stop = trio.Event()

    async def flood() -> None:
        nonlocal sent
        while not stop.is_set():
            await peer.stream.send_all(request * 100)
            sent += 100

    async with trio.open_nursery() as nursery:
        nursery.start_soon(flood)
        await trio.testing.wait_all_tasks_blocked(cushion=0.2)
        # Kernel buffers plus one read chunk of work: far below what an unbounded
        # reader would have swallowed by now.
        assert sent * len(request) < 8 * 1024 * 1024
        stop.set()
        answered = 0
        while answered < sent:
            message = await peer.next()
            assert message == Response(1, None, "PONG")
            answered += 1
    await peer.stream.send_eof()
    assert await peer.next() is None
    assert answered == sent


async def test_many_connections_are_served_together(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """Fifty clients at once each get their own answers."""

    async def client(index: int) -> None:
        peer = await connect()
        for round_ in range(20):
            await peer.request(round_, "session.set", f"u{index}", {"round": round_}, 60)
            assert (await peer.next()).result is True
        await peer.request(99, "session.get", f"u{index}")
        assert (await peer.next()).result == {"round": 19}
        await peer.stream.aclose()

    async with trio.open_nursery() as nursery:
        for index in range(50):
            nursery.start_soon(client, index)
    assert "wksd_connections_accepted_total 50.0" in daemon.metrics.render()


async def test_text_session_answers_one_line_per_request(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """A text session: one JSON line per request line, blank lines skipped, then close."""
    stream = (await connect()).stream
    await stream.send_all(
        b'session.set u1 {"role": "admin"} 60\n\nsession.get u1\r\nPING\nnope\nsession.get'
    )
    await stream.send_eof()
    lines = (await read_to_eof(stream)).decode().splitlines()
    assert lines[:3] == ["true", '{"role":"admin"}', '"PONG"']
    assert json.loads(lines[3])["error"]["code"] == "UNKNOWN_METHOD"
    assert json.loads(lines[4])["error"] == {
        "code": "BAD_REQUEST",
        "message": "session.get: user_id is required",
    }
    assert len(lines) == 5


async def test_text_metrics_is_prometheus_text(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """`metrics` on a text session answers with the exposition, several lines."""
    stream = (await connect()).stream
    await stream.send_all(b"metrics\n")
    await stream.send_eof()
    body = (await read_to_eof(stream)).decode()
    assert "# TYPE wksd_requests_total counter" in body
    assert body.count("\n") > 10


async def test_text_line_over_the_limit_is_refused_and_closed(
    daemon: Daemon, sock_path: str, connect: Connect
) -> None:
    """A text line longer than the message limit gets one error line, then a close."""
    stream = (await connect()).stream
    await stream.send_all(b"cache.set k " + b"x" * 70_000)
    out = await read_to_eof(stream)
    assert json.loads(out)["error"]["code"] == "TOO_LARGE"


async def test_peer_outside_the_allow_lists_is_refused(
    nursery: trio.Nursery, sock_path: str, connect: Connect
) -> None:
    """A uid and gids on no list get FORBIDDEN for every request, and it is logged."""
    with structlog.testing.capture_logs() as logs:
        await start_daemon(
            nursery, sock_path, allowed_uids=frozenset({54321}), allowed_gids=frozenset({54321})
        )
        peer = await connect()
        response = await peer.call("ping")
    assert response.error["code"] == "FORBIDDEN"
    refused = [entry for entry in logs if entry["event"] == "peer not allowed"]
    assert refused[0]["peer_uid"] == os.getuid() and refused[0]["peer_pid"] == os.getpid()


@pytest.mark.skipif(
    os.geteuid() != 0, reason="os.setgroups needs root (CAP_SETGID) to give this process a group"
)
async def test_supplementary_group_is_enough_to_be_allowed(
    nursery: trio.Nursery, sock_path: str, connect: Connect
) -> None:
    """A peer whose primary gid is not listed but a supplementary group is, is allowed."""
    groups = os.getgroups()
    os.setgroups([*groups, 4242])  # this process is the peer: give it a group
    try:
        await start_daemon(
            nursery,
            sock_path,
            allowed_uids=frozenset({54321}),
            allowed_gids=frozenset({4242}),
        )
        peer = await connect()
        assert (await peer.call("ping")).result == "PONG"
    finally:
        os.setgroups(groups)


async def test_non_admin_peer_cannot_clean_up(
    nursery: trio.Nursery, sock_path: str, connect: Connect
) -> None:
    """An allowed peer that is not an admin gets FORBIDDEN for workflow.cleanup only."""
    await start_daemon(nursery, sock_path, admin_uids=frozenset({54321}))
    peer = await connect()
    assert (await peer.call("workflow.cleanup")).error["code"] == "FORBIDDEN"
    assert (await peer.call("workflow.stats")).error is None


async def test_socket_is_created_with_its_mode(daemon: Daemon, sock_path: str) -> None:
    """The daemon's socket is a socket with mode 0660."""
    info = os.stat(sock_path)
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660


async def test_stale_socket_is_replaced(
    nursery: trio.Nursery, sock_path: str, connect: Connect
) -> None:
    """A socket file nobody listens on (a crashed daemon's) is removed and rebound."""
    stale = bind_unix_socket(sock_path, 0o600)
    stale.close()
    assert os.path.exists(sock_path)
    await start_daemon(nursery, sock_path)
    assert (await (await connect()).call("ping")).result == "PONG"


async def test_live_socket_is_not_stolen(daemon: Daemon, sock_path: str, connect: Connect) -> None:
    """A second daemon on a path another one serves refuses to start."""
    with pytest.raises(AddressInUse):
        bind_unix_socket(sock_path, 0o660)
    assert (await (await connect()).call("ping")).result == "PONG"


def test_a_regular_file_is_never_removed(sock_path: str) -> None:
    """A path that holds a regular file is an error, and the file stays."""
    with open(sock_path, "w") as f:
        f.write("precious")
    with pytest.raises(FileExistsError):
        bind_unix_socket(sock_path, 0o660)
    with open(sock_path) as f:
        assert f.read() == "precious"


async def test_shutdown_answers_what_was_read_then_exits(sock_path: str, connect: Connect) -> None:
    """On shutdown: requests already sent are answered, then the closing notice, then EOF."""
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, sock_path)
        peer = await connect()
        await peer.stream.send_all(b"".join(encode_request(i, "ping", []) for i in range(100)))
        first = await peer.next()
        daemon.shutdown()
        messages = [first]
        while (message := await peer.next()) is not None:
            messages.append(message)
        assert [m.msgid for m in messages[:-1]] == list(range(100))
        assert messages[-1] == Notification("closing", ["wksd is shutting down"])
    assert not os.path.exists(sock_path)


async def test_a_request_crossing_the_closing_notice_is_answered(
    sock_path: str, connect: Connect
) -> None:
    """A request sent just after the notice left the daemon is still answered before EOF."""
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, sock_path)
        peer = await connect()
        assert (await peer.call("ping")).result == "PONG"
        daemon.shutdown()
        assert await peer.next() == Notification("closing", ["wksd is shutting down"])
        await peer.request(7, "ping")  # crossed the notice on the wire
        assert await peer.next() == Response(7, None, "PONG")
        assert await peer.next() is None


async def test_an_idle_connection_is_closed_at_once_on_shutdown(
    sock_path: str, connect: Connect
) -> None:
    """Idle clients do not hold the shutdown: notice, a short grace, then EOF."""
    async with trio.open_nursery() as nursery:
        daemon = await start_daemon(nursery, sock_path, shutdown_timeout=30)
        peers = [await connect() for _ in range(5)]
        for peer in peers:
            assert (await peer.call("ping")).result == "PONG"
        with trio.fail_after(5):  # far below the 30 s shutdown timeout
            daemon.shutdown()
            for peer in peers:
                assert isinstance(await peer.next(), Notification)
                assert await peer.next() is None
