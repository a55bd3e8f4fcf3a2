"""The text protocol for socat one-liners (clientlib.textmode)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from clientlib.errors import BadRequest, ProtocolError
from clientlib.textmode import LineBuffer, format_error, format_result, is_text_start, parse_line


@pytest.mark.parametrize(
    ("line", "parsed"),
    [
        (b"health", ("health", [])),
        (b"HEALTH", ("health", [])),
        (b"Workflow.Get exec-123", ("workflow.get", ["exec-123"])),
        (
            b'session.set u1 {"role": "admin", "n": [1, 2]} 60',
            ("session.set", ["u1", {"role": "admin", "n": [1, 2]}, 60]),
        ),
        (b"cache.set k 1.5 10", ("cache.set", ["k", 1.5, 10])),
        (b'cache.set k "two words" null', ("cache.set", ["k", "two words", None])),
        (b"x 123abc {broken", ("x", ["123abc", "{broken"])),
        (b"x true false", ("x", [True, False])),
        (b"x NaN Infinity", ("x", ["NaN", "Infinity"])),
        (b"x 0123", ("x", ["0123"])),
        (b"  lock.status \t e1  ", ("lock.status", ["e1"])),
        ("session.get über".encode(), ("session.get", ["über"])),
    ],
)
def test_lines_parse_to_method_and_params(line: bytes, parsed: tuple[str, list[Any]]) -> None:
    """JSON where it parses, a bare word where it does not; methods lower-cased."""
    assert parse_line(line) == parsed


def test_blank_line_is_not_a_request() -> None:
    """Blank or space-only lines are skipped, not answered with an error."""
    assert parse_line(b"") is None
    assert parse_line(b"   \t") is None


def test_non_utf8_line_is_a_bad_request() -> None:
    """A line that is not UTF-8 is refused with BAD_REQUEST, not a crash."""
    with pytest.raises(BadRequest, match="UTF-8"):
        parse_line(b"session.get \xff\xfe")


def test_a_line_must_start_with_a_method_name() -> None:
    """A line opening with a JSON value has no method and is refused."""
    with pytest.raises(BadRequest):
        parse_line(b'{"a": 1} x')


@pytest.mark.parametrize("first", [b"a", b"Z", b"h"])
def test_letters_open_text_sessions(first: bytes) -> None:
    """An ASCII letter first means text."""
    assert is_text_start(first[0])


@pytest.mark.parametrize("first", [0x90, 0x94, 0x9F, 0xDC, 0xDD, ord("{"), ord("1"), 0xE9])
def test_msgpack_array_bytes_are_not_text(first: int) -> None:
    """msgpack-RPC requests begin with an array byte, never a letter."""
    assert not is_text_start(first)


def test_line_buffer_splits_lines_and_strips_crlf() -> None:
    """Lines come out whole, \\r\\n or \\n ended, split across any reads."""
    lines = LineBuffer(100)
    for piece in (b"pi", b"ng\r\nhea", b"lth\n", b"last"):
        lines.receive_data(piece)
    assert lines.next_line() == b"ping"
    assert lines.next_line() == b"health"
    assert lines.next_line() is None
    assert lines.rest() == b"last"
    assert lines.rest() is None


def test_line_buffer_bounds_an_unfinished_line() -> None:
    """A line longer than the limit raises even before its newline arrives."""
    lines = LineBuffer(10)
    lines.receive_data(b"x" * 10)
    assert lines.next_line() is None
    lines.receive_data(b"x")
    with pytest.raises(ProtocolError, match="longer than 10"):
        lines.next_line()


def test_line_buffer_bounds_a_finished_line() -> None:
    """A complete line over the limit is refused too."""
    lines = LineBuffer(10)
    lines.receive_data(b"x" * 11 + b"\n")
    with pytest.raises(ProtocolError):
        lines.next_line()


def test_results_are_one_compact_json_line() -> None:
    """A result is compact JSON on one line, non-ASCII kept as UTF-8."""
    out = format_result("session.get", {"name": "Zoë", "n": [1, 2]})
    assert out == '{"name":"Zoë","n":[1,2]}\n'.encode()
    assert format_result("ping", "PONG") == b'"PONG"\n'


def test_metrics_answer_is_the_raw_exposition() -> None:
    """metrics answers with Prometheus text, not a JSON string."""
    assert format_result("metrics", "a 1\nb 2\n") == b"a 1\nb 2\n"


def test_errors_are_an_error_object() -> None:
    """An error line carries the wire code and message."""
    line = format_error(BadRequest("nope"))
    assert json.loads(line) == {"error": {"code": "BAD_REQUEST", "message": "nope"}}
    assert line.count(b"\n") == 1
