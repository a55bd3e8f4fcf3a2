"""msgpack-RPC conformance and text-session rules at the real socket (DESIGN 2.1, 2.2).

An in-process daemon on a real Unix socket; raw peers (``tests.peers``) send
exactly the bytes under test.
"""

from __future__ import annotations

import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import msgpack
import pytest
import structlog
import trio

from clientlib.protocol import Notification, Response, encode_request
from wksd.app import Daemon

from .peers import Connect, Peer
from .polling import await_until
from .test_server import read_to_eof, start_daemon


@pytest.fixture
async def daemon(nursery: trio.Nursery, sock_path: str) -> AsyncIterator[Daemon]:
    daemon = await start_daemon(nursery, sock_path)
    yield daemon
    daemon.shutdown()


def metric(daemon: Daemon, line_start: str) -> float:
    """The value of the exposition line that starts with ``line_start`` (0 if absent)."""
    for line in daemon.metrics.render().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def text_exchange(connect: Connect, data: bytes) -> list[str]:
    """Send ``data`` on a fresh connection, half-close, and read every line back."""
    stream = (await connect()).stream
    with trio.fail_after(10):
        await stream.send_all(data)
        await stream.send_eof()
        return (await read_to_eof(stream)).decode().splitlines()


async def notify(peer: Peer, method: str, *params: Any) -> None:
    await peer.stream.send_all(msgpack.packb([2, method, list(params)]))


# -- client notifications ----------------------------------------------------------
async def test_a_known_notification_is_applied_and_never_answered(
    daemon: Daemon, connect: Connect
) -> None:
    """A notification is applied in order with the requests after it, and gets no response."""
    peer = await connect()
    await notify(peer, "session.set", "u1", {"role": "admin"}, 60)
    await peer.request(5, "session.get", "u1")
    assert await peer.next() == Response(5, None, {"role": "admin"})


async def test_unknown_and_failing_notifications_are_counted_not_answered(
    daemon: Daemon, connect: Connect
) -> None:
    """An unknown or failing notification is counted by reason, logged at debug level,
    and the connection stays open."""
    peer = await connect()
    with structlog.testing.capture_logs() as logs:
        await notify(peer, "no.such.method", 1)
        await notify(peer, "session.set", "u1", "not a map")
        await notify(peer, "workflow.complete", "e1", ["a list"])
        assert await peer.call("ping") == Response(1, None, "PONG")
    dropped = "wksd_client_notifications_dropped_total"
    assert metric(daemon, f'{dropped}{{reason="UNKNOWN_METHOD"}}') == 1
    assert metric(daemon, f'{dropped}{{reason="BAD_REQUEST"}}') == 2
    entries = [entry for entry in logs if entry["event"] == "client notification not applied"]
    assert [entry["log_level"] for entry in entries] == ["debug"] * 3
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]


async def test_a_notification_that_would_wait_does_not_wait(
    daemon: Daemon, connect: Connect
) -> None:
    """lock.acquire with a wait, as a notification, is tried once and leaves no waiter behind."""
    holder, notifier, third = await connect(), await connect(), await connect()
    assert (await holder.call("lock.acquire", "R", "A", 30)).result["acquired"]
    await notify(notifier, "lock.acquire", "R", "B", 30, False, 5)
    assert await notifier.call("ping") == Response(1, None, "PONG")
    assert daemon.holds.waiting == 0
    assert metric(daemon, 'wksd_client_notifications_dropped_total{reason="WAIT"}') == 1
    assert (await holder.call("lock.release", "R", "A")).result["released"]
    assert (await third.call("lock.acquire", "R", "C", 30)).result["acquired"]


async def test_a_response_from_a_client_is_a_bad_request(daemon: Daemon, connect: Connect) -> None:
    """The daemon sends no requests, so a response from a client is BAD_REQUEST, msgid nil."""
    peer = await connect()
    await peer.stream.send_all(msgpack.packb([1, 9, None, "x"]))
    response = await peer.next()
    assert isinstance(response, Response) and response.msgid is None
    assert response.error["code"] == "BAD_REQUEST"


# -- the first byte ----------------------------------------------------------------
@pytest.mark.parametrize("prefix", [b" ", b"\n", b"\r\n", b"\t", b"  \n\n "])
async def test_leading_whitespace_opens_a_text_session(
    daemon: Daemon, connect: Connect, prefix: bytes
) -> None:
    """A line starting with a space, or a blank first line, is text: JSON lines come back."""
    assert await text_exchange(connect, prefix + b"ping\n") == ['"PONG"']


@pytest.mark.parametrize("first", [b"\x00", b"\x7f", b"\x80", b"\xc1", b"\xe9", b"\xff"])
async def test_an_undecodable_first_byte_gets_protocol_error_then_close(
    daemon: Daemon, connect: Connect, first: bytes
) -> None:
    """A first byte neither text nor a msgpack array: protocol_error, then the close."""
    peer = await connect()
    await peer.stream.send_all(first + b"ping\n")
    message = await peer.next()
    assert isinstance(message, Notification) and message.method == "protocol_error"
    assert await peer.next() is None


# -- text sessions -------------------------------------------------------------------
async def test_every_text_line_gets_exactly_one_answer_line(
    daemon: Daemon, connect: Connect
) -> None:
    """Garbage, JSON without a method, control bytes, bad UTF-8: one JSON line each."""
    lines = [
        b'{"a": 1} x',
        b"\x1b[31m red",
        b"session.get \xff",
        b"ping " + b"a " * 100,
        b'session.get "\\ud83d"',
        b"cache.set k " + b"[" * 50_000,
        b"workflow.complete e1 [1]",
        b"cache.set k [18446744073709551616]",
        b"cache.set k 1 NaN",
        b"workflow.update e1 9007199254740992 x",
        b"ping",
    ]
    answers = await text_exchange(connect, b"\n".join(lines) + b"\n\n")
    assert len(answers) == len(lines)
    documents = [json.loads(answer) for answer in answers]
    assert documents[-1] == "PONG"
    codes = [document["error"]["code"] for document in documents[:-1]]
    assert codes[0] == "BAD_REQUEST" and codes[1] == "UNKNOWN_METHOD"
    assert set(codes[2:]) == {"BAD_REQUEST"}


async def test_lone_surrogate_identifier_is_a_bad_request(daemon: Daemon, connect: Connect) -> None:
    """An identifier with a lone surrogate (a text line's "\\ud83d") is BAD_REQUEST."""
    [answer] = await text_exchange(connect, b'session.set "u\\ud83d" {} 60\n')
    assert json.loads(answer)["error"]["code"] == "BAD_REQUEST"
    assert "surrogate" in json.loads(answer)["error"]["message"]


async def test_deeply_nested_text_argument_gets_a_clear_answer(
    daemon: Daemon, connect: Connect
) -> None:
    """A JSON argument nested past the parser's depth is one BAD_REQUEST line, no traceback."""
    with structlog.testing.capture_logs() as logs:
        [answer] = await text_exchange(connect, b"cache.set k " + b"[" * 100_000 + b"\n")
    assert json.loads(answer)["error"] == {
        "code": "BAD_REQUEST",
        "message": "an argument is nested too deeply",
    }
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]


async def test_text_subscribe_pushes_json_lines(daemon: Daemon, connect: Connect) -> None:
    """After workflow.subscribe, a text session's pushes are JSON lines, never msgpack."""
    watcher = (await connect()).stream
    await watcher.send_all(b"workflow.subscribe e1\n")
    received = b""
    while b"\n" not in received:
        received += await watcher.receive_some(65536)
    worker = await connect()
    await worker.call("workflow.start", "e1", "wf", 4)
    await worker.call("workflow.update", "e1", 1, "step one")
    while received.count(b"\n") < 3:
        received += await watcher.receive_some(65536)
    documents = [json.loads(line) for line in received.splitlines()]
    assert documents[0] is not None and "error" not in documents[0]
    assert [document["notification"] for document in documents[1:3]] == ["workflow.event"] * 2
    assert documents[2]["params"][0]["state"]["completedSteps"] == 1


async def test_answers_before_a_wait_are_sent_before_it(daemon: Daemon, connect: Connect) -> None:
    """A text line that waits does not hold back the answers to the lines before it."""
    holder = await connect()
    assert (await holder.call("lock.acquire", "R", "A", 30)).result["acquired"]
    stream = (await connect()).stream
    await stream.send_all(b"ping\nlock.acquire R B 30 false 5\n")
    with trio.fail_after(2):
        assert await stream.receive_some(65536) == b'"PONG"\n'
    assert (await holder.call("lock.release", "R", "A")).result["released"]
    with trio.fail_after(2):
        assert json.loads(await stream.receive_some(65536))["acquired"] is True


# -- waits whose peer leaves -------------------------------------------------------------
async def gone_waiter(daemon: Daemon, connect: Connect, text: bool) -> None:
    """Ask for R with a 5 s wait, half-close as socat does, then close for good
    once the daemon has queued the wait."""
    peer = await connect()
    if text:
        await peer.stream.send_all(b"lock.acquire R B 30 false 5\n")
    else:
        await peer.request(1, "lock.acquire", "R", "B", 30, False, 5)
    await peer.stream.send_eof()
    await await_until(lambda: daemon.holds.waiting == 1, "the wait is queued")
    await peer.stream.aclose()


@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
async def test_a_wait_is_cancelled_when_its_peer_closes(
    daemon: Daemon, connect: Connect, text: bool
) -> None:
    """A peer that leaves while its lock.acquire waits is never granted the lock."""
    holder = await connect()
    assert (await holder.call("lock.acquire", "R", "A", 30)).result["acquired"]
    await gone_waiter(daemon, connect, text)
    await await_until(lambda: daemon.holds.waiting == 0)
    assert (await holder.call("lock.release", "R", "A")).result["released"]
    third = await connect()
    assert (await third.call("lock.acquire", "R", "C", 30)).result["acquired"]
    assert (await third.call("lock.status", "R")).result["workerId"] == "C"
    assert metric(daemon, "wksd_waits_abandoned_total") >= 1


@pytest.mark.parametrize("text", [True, False], ids=["text", "binary"])
async def test_a_grant_to_a_peer_that_has_gone_is_revoked(
    daemon: Daemon, connect: Connect, text: bool
) -> None:
    """Granted in the moment the peer leaves, before the daemon notices: the undeliverable
    grant is revoked, so the lock is free for the next at once."""
    holder = await connect()
    assert (await holder.call("lock.acquire", "R", "A", 30)).result["acquired"]
    peer = await connect()
    if text:
        await peer.stream.send_all(b"lock.acquire R B 30 false 5\n")
    else:
        await peer.request(1, "lock.acquire", "R", "B", 30, False, 5)
    await await_until(lambda: daemon.holds.waiting == 1)
    peer.stream.socket.shutdown(socket.SHUT_RDWR)  # gone, with no time for a poll to see it
    await peer.stream.aclose()
    assert (await holder.call("lock.release", "R", "A")).result["released"]
    await await_until(lambda: daemon.holds.waiting == 0)
    third = await connect()

    async def third_acquires() -> bool:
        return bool((await third.call("lock.acquire", "R", "C", 30)).result["acquired"])

    await await_until(third_acquires, "the revoked lock to be free")
    assert (await third.call("lock.status", "R")).result["workerId"] == "C"


# -- fuzzed binary input ---------------------------------------------------------------
async def test_an_array_as_a_map_key_is_a_protocol_error_not_a_traceback(
    daemon: Daemon, connect: Connect
) -> None:
    """A map keyed by an array (unhashable) closes with protocol_error, logging no error."""
    peer = await connect()
    with structlog.testing.capture_logs() as logs:
        await peer.stream.send_all(b"\x94\x00\x01\xa4ping\x91\x81\x91\x01\x02")
        message = await peer.next()
        assert isinstance(message, Notification) and message.method == "protocol_error"
        assert await peer.next() is None
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")]
    other = await connect()
    assert (await other.call("ping")).result == "PONG"


async def test_msgpack_nested_past_its_limit_is_a_protocol_error(
    daemon: Daemon, connect: Connect
) -> None:
    """Nesting deeper than msgpack's 1024 levels closes with protocol_error."""
    peer = await connect()
    await peer.stream.send_all(b"\x94\x00\x01\xa4ping\x91" + b"\x91" * 2000 + b"\x90")
    message = await peer.next()
    assert isinstance(message, Notification) and message.method == "protocol_error"


async def test_number_keys_are_stored_as_json_strings(daemon: Daemon, connect: Connect) -> None:
    """Map keys that are numbers, booleans or nil come back as strings, as JSON has them."""
    peer = await connect()
    assert (await peer.call("session.set", "u1", {1: "a", 2.5: "b", None: "c"}, 60)).result
    assert (await peer.call("session.get", "u1")).result == {"1": "a", "2.5": "b", "null": "c"}


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("workflow.complete", ["e1", ["completed"]]),
        ("workflow.complete", ["e1", {"a": 1}]),
        ("session.set", ["u1", {"a": float("nan")}, 60]),
        ("session.set", ["u1", {}, float("nan")]),
        ("session.set", ["u1", {}, float("inf")]),
        ("cache.set", ["k", 1e308 * 10, 60]),
        ("workflow.start", ["e1", "wf", 2**64 - 1]),
        ("workflow.update", ["e1", 2**53, "x"]),
        ("lock.acquire", ["R", "A", 30, False, 1e300]),
        ("session.get", [b"bytes"]),
        ("cache.set", ["k", b"bytes", 60]),
    ],
)
async def test_values_a_handler_cannot_take_are_bad_requests(
    daemon: Daemon, connect: Connect, method: str, params: list[Any]
) -> None:
    """NaN, infinities, integers past 2**53-1, lists for a status, bytes: BAD_REQUEST."""
    peer = await connect()
    await peer.stream.send_all(encode_request(3, method, params))
    response = await peer.next()
    assert isinstance(response, Response) and response.error["code"] == "BAD_REQUEST"
