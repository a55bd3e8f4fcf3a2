"""The text protocol for socat one-liners (clientlib.textmode)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from clientlib.errors import BadRequest, TooLarge
from clientlib.protocol import is_binary_start
from clientlib.textmode import (
    MAX_ARGUMENTS,
    LineBuffer,
    format_error,
    format_notification,
    format_result,
    is_text_start,
    parse_line,
)


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
        (b'x [Infinity] {"a":NaN}', ("x", ["[Infinity]", '{"a":NaN}'])),
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


@pytest.mark.parametrize("first", [*b"aZh{1 ~", 0x09, 0x0A, 0x0D])
def test_printable_ascii_and_whitespace_open_text_sessions(first: int) -> None:
    """Printable ASCII or tab, LF, CR first means text (DESIGN 2.2)."""
    assert is_text_start(first)
    assert not is_binary_start(first)


@pytest.mark.parametrize("first", [0x90, 0x94, 0x9F, 0xDC, 0xDD])
def test_msgpack_array_bytes_open_binary_sessions(first: int) -> None:
    """msgpack-RPC messages begin with an array header, never text."""
    assert is_binary_start(first)
    assert not is_text_start(first)


@pytest.mark.parametrize("first", [0x00, 0x1B, 0x7F, 0x80, 0x8F, 0xA0, 0xC1, 0xDE, 0xE9, 0xFF])
def test_other_first_bytes_are_neither(first: int) -> None:
    """Any other first byte opens no session: the daemon answers protocol_error."""
    assert not is_text_start(first) and not is_binary_start(first)


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
    with pytest.raises(TooLarge, match="longer than 10"):
        lines.next_line()
    lines.receive_data(b"more\n")  # nothing is held beyond the limit once over it
    assert lines.rest() is None


def test_line_buffer_bounds_a_finished_line() -> None:
    """A complete line over the limit is refused too."""
    lines = LineBuffer(10)
    lines.receive_data(b"x" * 11 + b"\n")
    with pytest.raises(TooLarge):
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


def test_deeply_nested_argument_is_a_bad_request() -> None:
    """JSON nested past the parser's recursion is BAD_REQUEST, not a RecursionError."""
    with pytest.raises(BadRequest, match="nested too deeply"):
        parse_line(b"cache.set k " + b"[" * 100_000 + b"]" * 100_000)


def test_a_line_holds_a_bounded_number_of_arguments() -> None:
    """More than MAX_ARGUMENTS arguments is refused before the rest is read."""
    assert len(parse_line(b"x" + b" a" * MAX_ARGUMENTS)[1]) == MAX_ARGUMENTS  # type: ignore[index]
    with pytest.raises(BadRequest, match=f"at most {MAX_ARGUMENTS} arguments"):
        parse_line(b"x" + b" a" * 1_000_000)


def test_integers_msgpack_cannot_carry_are_refused_inside_json() -> None:
    """A JSON value holding an integer beyond 64 bits is BAD_REQUEST; alone it is a word."""
    assert parse_line(b"x 18446744073709551615 -9223372036854775808") == (
        "x",
        [2**64 - 1, -(2**63)],
    )
    assert parse_line(b"x 18446744073709551616") == ("x", ["18446744073709551616"])
    with pytest.raises(BadRequest, match="out of range"):
        parse_line(b'x {"n": 18446744073709551616}')


def test_malformed_json_cannot_make_parsing_quadratic() -> None:
    """Words that each start a long, failing JSON parse are refused once the
    failed reading exceeds the line's length."""
    with pytest.raises(BadRequest, match="malformed JSON"):
        parse_line(b"x " + b"[1, " * 200 + b"1, " * 100_000)


def test_control_bytes_and_huge_floats_are_words_or_numbers() -> None:
    """Control bytes are part of words; 1e400 reads as a float (refused later as not finite)."""
    assert parse_line(b"x a\x00b \x1b[0m 1e400") == ("x", ["a\x00b", "\x1b[0m", float("inf")])


@pytest.mark.parametrize(
    ("name", "line"),
    [
        ("a bare word", b"cache.set k " + b"x" * (2 * 1024 * 1024) + b" 60"),
        ("a JSON array", b"cache.set k [" + b"1," * (1024 * 1024) + b"1] 60"),
        ("spaces", b"ping" + b" " * (2 * 1024 * 1024)),
        ("broken JSON", b"cache.set k [1," + b"1 " * (1024 * 1024)),
        ("a long string", b'cache.set k "' + b"y" * (2 * 1024 * 1024) + b'" 60'),
    ],
)
def test_a_two_mebibyte_line_is_parsed_in_one_pass(name: str, line: bytes) -> None:
    """A 2 MiB line of any shape parses (or is refused) at C speed; the time is printed."""
    started = time.perf_counter()
    try:
        parsed = parse_line(line)
    except BadRequest as exc:
        outcome = exc.code
    else:
        assert parsed is not None
        outcome = f"{len(parsed[1])} params"
    print(f"2 MiB line, {name}: {(time.perf_counter() - started) * 1000:.1f} ms ({outcome})")


def test_a_lone_surrogate_is_written_as_a_json_escape() -> None:
    """A string UTF-8 cannot hold is answered as JavaScript writes it, \\ud83d."""
    assert format_result("session.get", {"a": "x\ud83d"}) == b'{"a":"x\\ud83d"}\n'


def test_notifications_are_one_json_line() -> None:
    """A pushed notification in a text session is one JSON document on one line."""
    line = format_notification("workflow.event", [{"executionId": "e1", "n": "a\nb"}])
    assert line.count(b"\n") == 1
    assert json.loads(line) == {
        "notification": "workflow.event",
        "params": [{"executionId": "e1", "n": "a\nb"}],
    }
