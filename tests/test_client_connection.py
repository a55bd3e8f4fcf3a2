"""The sans-IO client connection (clientlib._connection), without a socket.

Each rule is fed as bytes and read back as events, as h11's tests do: the
daemon's bytes whole, one byte at a time, and in odd chunks.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from clientlib import ConnectionLost, LockResult, NotFound, ProtocolError
from clientlib._calls import Call, acquire_lock, get_session, ping, unlock_workflow_execution
from clientlib._connection import (
    NEED_DATA,
    SEND_ATTEMPTS,
    Answer,
    ClientConnection,
    Closing,
    Ended,
    Event,
    Failure,
    LocksLost,
    Push,
)
from clientlib.protocol import MAX_MSGID, encode_notification, encode_request, encode_response

CLIENTLIB = Path(__file__).resolve().parent.parent / "clientlib"

Chunking = Callable[[ClientConnection, bytes], list[Event]]


def whole(connection: ClientConnection, data: bytes) -> list[Event]:
    connection.receive_data(data)
    return connection.events()


def in_chunks(size: int) -> Chunking:
    """Feed ``size`` bytes at a time, taking the events after each, until the
    connection ends (a client closes its socket then)."""

    def feed(connection: ClientConnection, data: bytes) -> list[Event]:
        events: list[Event] = []
        for index in range(0, len(data), size):
            connection.receive_data(data[index : index + size])
            events += connection.events()
            if connection.ended:
                break
        return events

    return feed


bytewise = in_chunks(1)
in_chunks_of_seven = in_chunks(7)


@pytest.fixture(params=[whole, bytewise, in_chunks_of_seven], ids=["whole", "bytewise", "by7"])
def feed(request: pytest.FixtureRequest) -> Chunking:
    """Hand the daemon's bytes to a connection in one way of chunking them."""
    chunked: Chunking = request.param
    return chunked


def lost_push(execution_id: str, worker_id: str, reason: str) -> bytes:
    params = [{"executionId": execution_id, "workerId": worker_id, "reason": reason}]
    return encode_notification("lock.lost", params)


def granted(msgid: int, worker_id: str = "w1") -> bytes:
    result = {"acquired": True, "workerId": worker_id, "fencingToken": 7, "expiresAt": 1}
    return encode_response(msgid, None, result)


# -- requests out, answers in ---------------------------------------------------


def test_a_request_is_its_msgpack_rpc_bytes() -> None:
    """send_request gives a fresh msgid and the request's bytes, as the protocol encodes it."""
    connection = ClientConnection()
    first, data = connection.send_request(get_session("u1"))
    second, _ = connection.send_request(ping())
    assert data == encode_request(first, "session.get", ["u1"])
    assert msgpack.unpackb(data) == [0, first, "session.get", ["u1"]]
    assert second != first and connection.outstanding == 2


def test_answers_out_of_order_reach_their_requests(feed: Chunking) -> None:
    """Two answers in the reverse order of their requests each name their msgid, converted."""
    connection = ClientConnection()
    first, _ = connection.send_request(get_session("u1"))
    second, _ = connection.send_request(Call("cache.delete", ["k"], bool))
    data = encode_response(second, None, 1) + encode_response(first, None, {"role": "admin"})
    assert feed(connection, data) == [Answer(second, True), Answer(first, {"role": "admin"})]
    assert connection.outstanding == 0 and connection.can_send


def test_an_incomplete_answer_needs_data() -> None:
    """Half an answer is NEED_DATA; the rest completes it; nothing more is NEED_DATA again."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    data = encode_response(msgid, None, "PONG")
    connection.receive_data(data[:3])
    assert connection.next_event() is NEED_DATA
    connection.receive_data(data[3:])
    assert connection.next_event() == Answer(msgid, "PONG")
    assert connection.next_event() is NEED_DATA


def test_an_error_answer_is_a_failure_with_its_exception(feed: Chunking) -> None:
    """The error map of a response becomes the exception of its wire code."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    error = {"code": "NOT_FOUND", "message": "no such execution"}
    (event,) = feed(connection, encode_response(msgid, error, None))
    assert isinstance(event, Failure) and event.msgid == msgid
    assert isinstance(event.error, NotFound) and event.error.message == "no such execution"


def test_a_malformed_answer_fails_its_call_only(feed: Chunking) -> None:
    """A result the call cannot convert is a ProtocolError for that call; the connection goes on."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(Call("lock.status", ["e1"], lambda r: r["locked"]))
    (event,) = feed(connection, encode_response(msgid, None, "not a map"))
    assert isinstance(event, Failure) and isinstance(event.error, ProtocolError)
    assert connection.can_send and not connection.ended


def test_answers_no_request_waits_for_are_dropped(feed: Chunking) -> None:
    """Answers to an unknown msgid or to an abandoned call are dropped; the next one comes."""
    connection = ClientConnection()
    gave_up, _ = connection.send_request(ping())
    waiting, _ = connection.send_request(ping())
    connection.abandon(gave_up)
    data = (
        encode_response(4242, None, "stray")
        + encode_response(gave_up, None, "late")
        + encode_response(waiting, None, "PONG")
    )
    assert feed(connection, data) == [Answer(waiting, "PONG")]


def test_an_answer_without_msgid_goes_to_the_only_request() -> None:
    """msgid nil (the daemon could not read a request) answers the one outstanding request."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    bad = {"code": "BAD_REQUEST", "message": "unreadable"}
    (event,) = whole(connection, encode_response(None, bad, None))
    assert isinstance(event, Failure) and event.msgid == msgid
    connection.send_request(ping())
    connection.send_request(ping())
    assert whole(connection, encode_response(None, bad, None)) == []  # whose? nobody's


def test_msgids_wrap_and_skip_outstanding_ones() -> None:
    """After 2**32-1 the msgid wraps to 0, skipping one still outstanding."""
    connection = ClientConnection()
    connection._msgid = MAX_MSGID - 2  # as after four billion requests
    assert connection.send_request(ping())[0] == MAX_MSGID - 1
    assert connection.send_request(ping())[0] == MAX_MSGID
    assert connection.send_request(ping())[0] == 0
    connection._msgid = MAX_MSGID - 1
    assert connection.send_request(ping())[0] == 1  # MAX_MSGID and 0 are still out


# -- pushes, and the closing notice ---------------------------------------------


def test_notifications_are_pushes_in_order_with_answers(feed: Chunking) -> None:
    """Pushes come out as Push events, in the order they arrived among the answers."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    data = (
        encode_notification("workflow.event", [{"executionId": "e1"}])
        + encode_response(msgid, None, "PONG")
        + encode_notification("workflow.events_dropped", [3])
    )
    assert feed(connection, data) == [
        Push("workflow.event", [{"executionId": "e1"}]),
        Answer(msgid, "PONG"),
        Push("workflow.events_dropped", [3]),
    ]


def test_after_the_closing_notice_nothing_goes_out(feed: Chunking) -> None:
    """Closing stops new requests; outstanding ones are answered, then the connection ends."""
    connection = ClientConnection()
    first, _ = connection.send_request(ping())
    second, _ = connection.send_request(ping())
    events = feed(
        connection,
        encode_response(first, None, "PONG")
        + encode_notification("closing", ["shutdown"])
        + encode_response(second, None, "PONG"),
    )
    assert events[:3] == [Answer(first, "PONG"), Closing(["shutdown"]), Answer(second, "PONG")]
    assert isinstance(events[3], Ended) and isinstance(events[3].error, ConnectionLost)
    assert len(events) == 4 and not connection.can_send
    with pytest.raises(RuntimeError, match="no new request"):
        connection.send_request(ping())


def test_a_closing_notice_on_an_idle_connection_ends_it() -> None:
    """With nothing outstanding, the closing notice ends the connection at once."""
    connection = ClientConnection()
    events = whole(connection, encode_notification("closing", ["shutdown"]))
    assert events[0] == Closing(["shutdown"]) and isinstance(events[1], Ended)
    assert "shutting down" in str(events[1].error)


# -- the ways a connection ends ---------------------------------------------------


def test_end_of_stream_fails_what_is_outstanding() -> None:
    """The daemon closing its end fails each outstanding request, then Ended stays."""
    connection = ClientConnection()
    first, _ = connection.send_request(ping())
    second, _ = connection.send_request(ping())
    events = whole(connection, b"")
    assert [type(event) for event in events] == [Failure, Failure, Ended]
    assert {event.msgid for event in events[:2]} == {first, second}
    assert all(isinstance(event.error, ConnectionLost) for event in events)
    assert events[0].error is not events[1].error
    connection.receive_data(encode_response(first, None, "too late"))
    assert connection.next_event() == events[2] and connection.events() == [events[2]]


def test_answers_before_the_end_of_stream_still_arrive() -> None:
    """Bytes read before the end are answered first; only what is left fails."""
    connection = ClientConnection()
    first, _ = connection.send_request(ping())
    second, _ = connection.send_request(ping())
    connection.receive_data(encode_response(first, None, "PONG"))
    connection.receive_data(b"")
    events = connection.events()
    assert events[0] == Answer(first, "PONG")
    assert isinstance(events[1], Failure) and events[1].msgid == second


@pytest.mark.parametrize(
    "garbage", [b"\xc1", b"\xc1\xc1\xc1", encode_request(9, "ping", [])], ids=repr
)
def test_what_no_daemon_sends_is_a_protocol_error(garbage: bytes, feed: Chunking) -> None:
    """Undecodable bytes, or a request from the daemon, end the connection with
    ProtocolError, after the answers that came before them."""
    connection = ClientConnection()
    first, _ = connection.send_request(ping())
    second, _ = connection.send_request(ping())
    events = feed(connection, encode_response(first, None, "PONG") + garbage + b"\x90trailing")
    assert events[0] == Answer(first, "PONG")
    assert isinstance(events[1], Failure) and events[1].msgid == second
    assert isinstance(events[1].error, ProtocolError)
    assert isinstance(events[2], Ended) and isinstance(events[2].error, ProtocolError)
    assert len(events) == 3


def test_the_protocol_error_notice_ends_with_its_text(feed: Chunking) -> None:
    """The daemon's protocol_error notice fails what is outstanding with its reason."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    events = feed(connection, encode_notification("protocol_error", ["too big"]))
    assert isinstance(events[0], Failure) and events[0].msgid == msgid
    assert "too big" in str(events[0].error) and isinstance(events[0].error, ProtocolError)
    assert isinstance(events[1], Ended)


def test_a_broken_transport_fails_with_its_reason() -> None:
    """broken(reason): every outstanding request fails with ConnectionLost(reason)."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(ping())
    connection.broken("connection to wksd broke: Connection reset by peer")
    failure, ended = connection.events()
    assert isinstance(failure, Failure) and failure.msgid == msgid
    assert str(failure.error) == "connection to wksd broke: Connection reset by peer"
    assert isinstance(ended, Ended) and connection.ended
    connection.broken("again")  # nothing more: it had ended
    assert connection.events() == [ended]


# -- resend safety ------------------------------------------------------------------


def test_a_failed_write_may_be_sent_once_more() -> None:
    """A request whose write failed may go out on a fresh connection, once; the
    others outstanding on that connection fail, since they may have been applied."""
    connection = ClientConnection()
    written, _ = connection.send_request(ping())
    failed, _ = connection.send_request(ping())
    assert connection.write_failed(failed, "sending to wksd failed: Broken pipe") is True
    events = connection.events()
    assert [(type(event), getattr(event, "msgid", None)) for event in events] == [
        (Failure, written),  # never resent: it may have been applied
        (Ended, None),
    ]
    fresh = ClientConnection()
    again, _ = fresh.send_request(ping(), attempt=SEND_ATTEMPTS)
    assert fresh.write_failed(again, "sending to wksd failed: Broken pipe") is False


# -- keepalive locks ----------------------------------------------------------------


def keepalive_lock(connection: ClientConnection, on_lost: Any = None) -> LockResult:
    """A keepalive lock on e1 for w1, granted on ``connection``."""
    msgid, _ = connection.send_request(acquire_lock("e1", "w1", keepalive=True, on_lost=on_lost))
    (event,) = whole(connection, granted(msgid))
    assert isinstance(event, Answer) and isinstance(event.value, LockResult)
    return event.value


def test_a_lock_lost_push_reports_the_lock_it_names(feed: Chunking) -> None:
    """lock.lost marks the granted lock lost with its reason, leaving the callback to the client."""
    called: list[LockResult] = []
    connection = ClientConnection()
    lock = keepalive_lock(connection, called.append)
    assert len(connection.held) == 1
    events = feed(connection, lost_push("e2", "w1", "expired") + lost_push("e1", "w1", "expired"))
    assert events[0] == Push(
        "lock.lost", [{"executionId": "e2", "workerId": "w1", "reason": "expired"}]
    )
    assert events[1] == LocksLost((lock,)) and events[2].method == "lock.lost"
    assert lock.lost_reason == "expired" and called == []  # fire() is the client's
    assert len(connection.held) == 0


def test_a_push_right_after_the_grant_is_not_missed() -> None:
    """A grant and its lock.lost in one read: the lock is watched before the push is read."""
    connection = ClientConnection()
    msgid, _ = connection.send_request(acquire_lock("e1", "w1", keepalive=True))
    events = whole(connection, granted(msgid) + lost_push("e1", "w1", "not_owner"))
    assert isinstance(events[0], Answer) and events[1] == LocksLost((events[0].value,))
    assert events[0].value.lost_reason == "not_owner"


def test_only_keepalive_grants_are_watched() -> None:
    """A refused acquire, or one without keepalive, leaves nothing to report lost."""
    connection = ClientConnection()
    plain, _ = connection.send_request(acquire_lock("e1", "w1"))
    refused, _ = connection.send_request(acquire_lock("e2", "w1", keepalive=True))
    data = granted(plain) + encode_response(refused, None, {"acquired": False, "workerId": "x"})
    whole(connection, data)
    assert len(connection.held) == 0


def test_a_release_answered_ends_the_watch() -> None:
    """After its release is answered, a push for the lock reports nothing lost."""
    connection = ClientConnection()
    lock = keepalive_lock(connection)
    msgid, _ = connection.send_request(unlock_workflow_execution("e1", "w1"))
    assert whole(connection, encode_response(msgid, None, {"released": True})) == [
        Answer(msgid, True)
    ]
    assert not any(isinstance(e, LocksLost) for e in whole(connection, lost_push("e1", "w1", "x")))
    assert not lock.lost


def test_the_end_of_the_connection_loses_its_locks() -> None:
    """The daemon releases a connection's keepalive locks with it: lost, disconnected."""
    connection = ClientConnection()
    lock = keepalive_lock(connection)
    events = whole(connection, b"")
    assert events == [LocksLost((lock,)), events[-1]] and isinstance(events[-1], Ended)
    assert lock.lost_reason == "disconnected"


def test_closing_on_purpose_is_not_a_loss() -> None:
    """close(): the outstanding requests fail, but the locks were released, not lost."""
    connection = ClientConnection()
    lock = keepalive_lock(connection)
    msgid, _ = connection.send_request(ping())
    connection.close()
    failure, ended = connection.events()
    assert isinstance(failure, Failure) and failure.msgid == msgid
    assert "closed" in str(failure.error) and isinstance(ended, Ended)
    assert not lock.lost


# -- what clientlib imports ---------------------------------------------------------


def imported_roots(path: Path) -> Iterator[str]:
    """The top-level name of every module ``path`` imports absolutely."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


def test_clientlib_needs_msgpack_and_the_standard_library_only() -> None:
    """No module of clientlib imports wksd, trio or redis; anyio only the async client."""
    outside = {
        path.name: sorted(set(imported_roots(path)) - set(sys.stdlib_module_names) - {"clientlib"})
        for path in sorted(CLIENTLIB.glob("*.py"))
    }
    allowed = {"_async.py": ["anyio"], "protocol.py": ["msgpack"]}
    assert outside == {name: allowed.get(name, []) for name in outside}
    assert "_connection.py" in outside and "_sync.py" in outside  # the walk saw them


def test_async_client_without_anyio_says_what_to_install() -> None:
    """Without anyio, the sync client imports, and `from clientlib import AsyncClient`
    ends the program with an ImportError whose line says what to install."""
    code = (
        "import sys\n"
        "sys.modules['anyio'] = None  # as if the 'async' extra were not installed\n"
        "from clientlib import Client\n"
        "print('sync client imported')\n"
        "from clientlib import AsyncClient\n"
    )
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert (ran.returncode, ran.stdout) == (1, "sync client imported\n")
    last_line = ran.stderr.strip().splitlines()[-1]
    assert last_line.startswith("ImportError: ") and "pip install 'wksd[async]'" in last_line
