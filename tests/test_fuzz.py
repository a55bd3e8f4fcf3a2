"""Fuzzed input at the real socket of the real daemon, both protocols (issue 9, part 8).

A seeded generator (hypothesis, derandomized) writes text sessions (methods
from the method table and garbage, JSON-ish arguments, lone surrogates,
control bytes, deep nesting) and binary ones (valid and invalid envelopes,
random msgpack types, notifications, raw bytes), each on a fresh connection
to one ``python -m wksd`` process, while a good client keeps calling
``ping``, ``session.set`` and ``session.get`` in a thread. The rules checked
are DESIGN 2.1 and 2.2: every text request line is answered exactly once
with one JSON document; every binary request (or invalid envelope) is
answered, a notification never is, and undecodable bytes end the
connection after a ``protocol_error``; the good client never sees an
error; the daemon stays up and logs no error.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clientlib import Client
from clientlib.protocol import NEED_DATA, Decoder, Notification, Response, encode_request
from wksd.app import Daemon
from wksd.config import Config

from .processes import DaemonProcess

#: Examples per protocol: enough to meet every shape below several times,
#: few enough that the module stays under ~20 s on a loaded 2-core machine.
#: WKSD_FUZZ_EXAMPLES runs more, for a longer look by hand.
EXAMPLES = int(os.environ.get("WKSD_FUZZ_EXAMPLES", "300"))

#: How long one fuzzed connection may take to be answered and closed.
CONNECTION_DEADLINE = 10.0

#: The methods a fuzzed session may call. ``metrics`` (answered with many
#: lines) and ``cache.lease`` (it waits) are left out; lock.acquire is sent
#: without its wait argument, so no session waits.
METHODS = sorted(set(Daemon(Config()).dispatcher.methods) - {"metrics", "cache.lease"})

_ids = st.sampled_from(["e1", "u1", "k", "R", "A", "wf", "completed", "failed"])
_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=8)
    | _ids,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=4)
    ),
    max_leaves=12,
)


def _method_name(draw: Any) -> str:
    name: str = draw(st.sampled_from(METHODS) | st.text(min_size=1, max_size=12))
    return name.upper() if draw(st.booleans()) else name


@st.composite
def text_argument(draw: Any) -> bytes:
    kind = draw(st.integers(0, 6))
    if kind == 0:  # a JSON value (NaN and infinities written as Python writes them)
        return json.dumps(draw(_json)).encode()
    if kind == 1:  # a bare word, any bytes but the separators
        return draw(st.binary(min_size=1, max_size=12)).translate(None, b" \t\n")
    if kind == 2:  # a lone surrogate, as JSON.stringify escapes it
        return b'"x\\ud83d"' if draw(st.booleans()) else b'"\\udc00"'
    if kind == 3:  # deep nesting
        depth = draw(st.sampled_from([10, 600, 5000, 50_000]))
        return b"[" * depth + b"]" * draw(st.sampled_from([0, depth]))
    if kind == 4:  # control bytes
        return bytes(
            draw(
                st.lists(
                    st.integers(0, 31).filter(lambda b: b not in (9, 10)), min_size=1, max_size=6
                )
            )
        )
    if kind == 5:  # numbers at the edges
        return str(draw(st.sampled_from([2**53, 2**64, -(2**63) - 1, 10**400]))).encode()
    return draw(_ids).encode()


@st.composite
def text_line(draw: Any) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=30)).replace(b"\n", b" ")  # garbage, blank lines too
    method = _method_name(draw)
    args = draw(st.lists(text_argument(), max_size=5))
    if method.lower() == "lock.acquire":
        args = args[:4]
    separator = draw(st.sampled_from([b" ", b"  ", b"\t"]))
    line = separator.join([method.encode(errors="surrogatepass"), *args]).replace(b"\n", b" ")
    return line + (b"\r" if draw(st.booleans()) else b"")


def _msgpack_value() -> st.SearchStrategy[Any]:
    return st.recursive(
        st.none()
        | st.booleans()
        | st.integers(-(2**63), 2**64 - 1)
        | st.floats()
        | st.text(max_size=8)
        | st.binary(max_size=8)
        | _ids,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(st.text(max_size=4) | st.integers(0, 9), inner, max_size=4)
        ),
        max_leaves=12,
    )


@st.composite
def binary_message(draw: Any) -> Any:
    kind = draw(st.integers(0, 4))
    params = draw(st.lists(_msgpack_value(), max_size=5))
    method = _method_name(draw)
    if method.lower() == "lock.acquire":
        params = params[:4]
    if kind == 0:
        return [0, draw(st.integers(0, 2**32 - 1)), method, params]
    if kind == 1:
        return [2, method, params]
    if kind == 2:  # an envelope a field off
        return draw(
            st.sampled_from(
                [
                    [0, -1, method, params],
                    [0, 2**32, method, params],
                    [0, 1, 5, params],
                    [0, 1, method, "params"],
                    [0, 1, method],
                    [2, method],
                    [2, 5, params],
                    [True, 1, method, params],
                    [1, 1, None, None],
                    [3, 1, method, params],
                    [],
                ]
            )
        )
    return draw(_msgpack_value())


def expected_msgid(message: Any) -> int | None:
    """The msgid a response to ``message`` carries: the request's, when it can be read."""
    if (
        isinstance(message, list)
        and len(message) == 4
        and type(message[0]) is int
        and message[0] == 0
        and type(message[1]) is int
        and 0 <= message[1] < 2**32
    ):
        return message[1]
    return None


def is_notification(message: Any) -> bool:
    return (
        isinstance(message, list)
        and len(message) == 3
        and type(message[0]) is int
        and message[0] == 2
        and isinstance(message[1], str)
        and isinstance(message[2], list)
    )


def exchange(path: str, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection, half-close, read to the daemon's close."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECTION_DEADLINE)
        sock.connect(path)
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except BrokenPipeError:
            pass  # closed early (a protocol error): what came back says why
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
        return b"".join(chunks)


class GoodClient(threading.Thread):
    """Calls ping, session.set and session.get until stopped; keeps any failure."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.stopping = threading.Event()
        self.failure: BaseException | None = None
        self.calls = 0
        self.worst = 0.0

    def run(self) -> None:
        try:
            with Client(self.path) as client:
                while not self.stopping.is_set():
                    started = time.perf_counter()
                    assert client.ping() == "PONG"
                    client.set_session("good", {"n": self.calls}, ttl=60)
                    assert client.get_session("good") == {"n": self.calls}
                    self.worst = max(self.worst, time.perf_counter() - started)
                    self.calls += 1
        except BaseException as exc:
            self.failure = exc


@pytest.fixture(scope="module")
def fuzzed_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    """One daemon for the whole module, with a good client working on it throughout."""
    path = str(tmp_path_factory.mktemp("fuzz", numbered=True) / "s")
    if len(path) > 100:
        pytest.skip("temporary path too long for a Unix socket")
    daemon = DaemonProcess(path).start()
    good = GoodClient(path)
    good.start()
    yield daemon
    good.stopping.set()
    good.join(10)
    print(f"good client: {good.calls} rounds, worst {good.worst * 1000:.1f} ms")
    try:
        assert good.failure is None, f"the good client failed: {good.failure!r}"
        assert daemon.process is not None and daemon.process.poll() is None, "wksd died"
        errors = [
            line
            for line in daemon.output.splitlines()
            if '"level": "error"' in line or '"level": "critical"' in line or "Traceback" in line
        ]
        assert not errors, "\n".join(errors[:5])
    finally:
        daemon.close()


FUZZ = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.lists(text_line(), min_size=1, max_size=6))
def test_every_text_line_is_answered_once(fuzzed_daemon: DaemonProcess, lines: list[bytes]) -> None:
    """Each request line gets exactly one JSON line back; pushes are JSON lines too."""
    data = b"ping\n" + b"\n".join(lines) + b"\n"
    out = exchange(fuzzed_daemon.path, data)
    requests = 1 + sum(1 for line in lines if line.removesuffix(b"\r").strip(b" \t"))
    answers = []
    for raw in out.splitlines():
        document = json.loads(raw)  # every line is one JSON document
        if not (isinstance(document, dict) and "notification" in document):
            answers.append(document)
    assert answers[0] == "PONG"
    assert len(answers) == requests, (lines, out[:2000])
    for answer in answers:
        if isinstance(answer, dict) and "error" in answer:
            assert answer["error"]["code"] != "INTERNAL", (lines, answer)


def _decode_all(out: bytes) -> list[Any]:
    decoder = Decoder(64 * 1024 * 1024)
    decoder.receive_data(out)
    messages = []
    while (event := decoder.next_event()) is not NEED_DATA:
        messages.append(event)
    return messages


@FUZZ
@given(st.lists(binary_message(), min_size=1, max_size=6))
def test_every_binary_request_is_answered(
    fuzzed_daemon: DaemonProcess, messages: list[Any]
) -> None:
    """Requests and invalid envelopes are answered, in order; notifications never are."""
    messages = [[0, 0, "ping", []], *messages]  # a first message opens a binary session
    data = b"".join(msgpack.packb(message) for message in messages) + encode_request(
        2**32 - 1, "ping", []
    )
    out = exchange(fuzzed_daemon.path, data)
    received = _decode_all(out)
    responses = [message for message in received if isinstance(message, Response)]
    expected = [expected_msgid(message) for message in messages if not is_notification(message)]
    assert [response.msgid for response in responses if response.msgid != 2**32 - 1] == [
        msgid for msgid in expected if msgid != 2**32 - 1
    ], (messages, received)
    assert responses[-1] == Response(2**32 - 1, None, "PONG")
    for response in responses:
        if response.error is not None:
            assert response.error["code"] != "INTERNAL", (messages, response)
    assert not [m for m in received if isinstance(m, Notification) and m.method == "protocol_error"]


@FUZZ
@given(st.binary(min_size=1, max_size=64))
def test_raw_bytes_are_answered_or_closed_with_protocol_error(
    fuzzed_daemon: DaemonProcess, data: bytes
) -> None:
    """Whatever the bytes, the daemon answers in the protocol they chose, or closes."""
    out = exchange(fuzzed_daemon.path, data)
    if data[0] in b"\t\n\r" or 0x20 <= data[0] < 0x7F:
        for raw in out.splitlines():
            json.loads(raw)
    elif out:
        received = _decode_all(out)
        protocol_errors = [
            m for m in received if isinstance(m, Notification) and m.method == "protocol_error"
        ]
        assert not protocol_errors or received[-1] is protocol_errors[0]
