"""The text protocol for socat one-liners, sans-IO (DESIGN section 2.2).

A connection whose first byte is printable ASCII or whitespace (tab, line
feed, carriage return, 0x20-0x7e) speaks lines: ``METHOD [ARG ...]``, where
each argument is a JSON value if one parses there (objects may contain
spaces) and a bare word otherwise. Every request line gets exactly one line
back: compact JSON, or ``{"error": {...}}``. ``metrics`` is the one
exception: it answers with the Prometheus text exposition, several lines.
Notifications the daemon pushes are lines too, ``{"notification": METHOD,
"params": [...]}``, so every line of a text session is one JSON document.

Blank lines are skipped without an answer, so a trailing newline or an empty
line in a here-document never produces a stray error.

Parsing costs time linear in the line, spent in C: lines are cut with
``bytes.find``, spaces and bare words are skipped with regular expressions,
and JSON arguments are read by the json module's C scanner one at a time
(``raw_decode``). Nothing loops over characters in Python. Three guards keep
a hostile line from costing more: at most ``MAX_ARGUMENTS`` arguments are
read, a JSON argument nested too deeply is a ``BadRequest`` (not a
``RecursionError``), and the bytes the scanner reads for attempts that fail
(``[1, [1, [1, ...`` makes each one read to the end) are bounded by the
line's own length.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .errors import BadRequest, RemoteError, TooLarge

__all__ = [
    "MAX_ARGUMENTS",
    "LineBuffer",
    "format_error",
    "format_notification",
    "format_result",
    "is_text_start",
    "parse_line",
]

#: Bytes that open a text session: printable ASCII and the whitespace a
#: terminal or here-document starts with (DESIGN 2.2).
_TEXT_START: Final = frozenset(b"\t\n\r" + bytes(range(0x20, 0x7F)))

#: A line holds at most this many arguments: no method takes more than five,
#: and reading a million one-character words would cost a Python loop each.
MAX_ARGUMENTS: Final = 16

#: Integers a text argument may hold: what msgpack can carry to a binary
#: client (int64 to uint64). Python's json reads any size; a value stored
#: beyond this could never be answered in msgpack.
_MIN_INTEGER: Final = -(2**63)
_MAX_INTEGER: Final = 2**64 - 1

#: An integer literal this long may be out of range; shorter ones never are,
#: so the slower range check runs only on lines that hold a run of this many
#: digits (found with translate and a substring search: C speed, unlike a
#: regular expression, which costs a match attempt at every digit).
_LONG_DIGITS: Final = b"0" * 19
_DIGITS_AS_ZERO: Final = bytes.maketrans(b"123456789", b"000000000")

_SPACE_CHARS: Final = " \t"

#: Characters looked at first when skipping spaces or finding a word's end;
#: the window doubles from there, so a long run costs linear C time and the
#: usual one-space gap copies almost nothing.
_FIRST_WINDOW: Final = 64

#: Characters the JSON scanner may read for failed attempts on one line,
#: beyond the line's own length (room for a short line's few false starts).
_FAILED_SCAN_SLACK: Final = 4096


def is_text_start(first_byte: int) -> bool:
    """True when a connection's first byte opens a text session."""
    return first_byte in _TEXT_START


class LineBuffer:
    """Splits a byte stream into lines, with a bound on a line's length.

    An unfinished line is held only up to the bound: once it is over,
    ``next_line`` raises ``TooLarge`` (a ``RemoteError``, so it can be
    answered) and the buffer is dropped; the session must then close, as the
    rest of the stream cannot be framed.
    """

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no newline
        self._broken = False

    def receive_data(self, data: bytes) -> None:
        if not self._broken:
            self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line without its ending, or None.

        Raises ``TooLarge`` once a line, finished or not, is over the limit.
        """
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_line_bytes:
                raise self._too_large()
            return None
        if end > self.max_line_bytes:
            raise self._too_large()
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line.removesuffix(b"\r")

    def rest(self) -> bytes | None:
        """At end of input: an unterminated last line, if any."""
        if not self._buffer:
            return None
        if len(self._buffer) > self.max_line_bytes:
            raise self._too_large()
        line = bytes(self._buffer).removesuffix(b"\r")
        self._buffer.clear()
        self._scanned = 0
        return line

    def _too_large(self) -> TooLarge:
        self._broken = True
        self._buffer = bytearray()
        self._scanned = 0
        return TooLarge(f"line longer than {self.max_line_bytes} bytes")


class _OutOfRange(Exception):
    """An integer literal msgpack cannot carry (not a ValueError, so the
    scanner does not take it for "not JSON")."""


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; as bare words they stay strings.
    raise ValueError(name)


def _checked_int(literal: str) -> int:
    value = int(literal)
    if not _MIN_INTEGER <= value <= _MAX_INTEGER:
        raise _OutOfRange(literal)
    return value


_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants)
_RANGE_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants, parse_int=_checked_int)


def parse_line(line: bytes) -> tuple[str, list[Any]] | None:
    """``(method, params)`` of a request line; None for a blank line.

    The method name is lower-cased (names are case-insensitive). Raises
    ``BadRequest`` for a line that is not UTF-8, that has more than
    ``MAX_ARGUMENTS`` arguments, an argument nested too deeply, an integer
    msgpack cannot carry inside a JSON value (alone, a long number is a bare
    word), or JSON so malformed that reading it costs more than
    the line is long.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a text request must be UTF-8") from None
    long_digits = _LONG_DIGITS in line.translate(_DIGITS_AS_ZERO)
    decoder = _RANGE_DECODER if long_digits else _DECODER
    try:
        tokens = _tokens(text, decoder)
    except RecursionError:
        raise BadRequest("an argument is nested too deeply") from None
    except _OutOfRange as exc:
        raise BadRequest(
            f"integer {str(exc)[:40]} is out of range ({_MIN_INTEGER} to {_MAX_INTEGER})"
        ) from None
    if not tokens:
        return None
    method = tokens[0]
    if not isinstance(method, str):
        raise BadRequest("a line starts with a method name")
    return method.lower(), tokens[1:]


def _tokens(text: str, decoder: json.JSONDecoder) -> list[Any]:
    values: list[Any] = []
    size = len(text)
    failed_budget = size + _FAILED_SCAN_SLACK
    pos = _skip_spaces(text, 0)
    while pos < size:
        if len(values) > MAX_ARGUMENTS:
            raise BadRequest(f"a line holds at most {MAX_ARGUMENTS} arguments")
        end = -1
        if text[pos] in '[{"-0123456789tfn':  # what a JSON value can start with
            try:
                value, end = decoder.raw_decode(text, pos)
            except ValueError as exc:
                # A JSONDecodeError says where it stopped; NaN or Infinity
                # (refused by _no_constants) does not: charge the whole rest.
                stopped = exc.pos if isinstance(exc, json.JSONDecodeError) else size
                failed_budget -= max(stopped - pos, 1)
                if failed_budget < 0:
                    raise BadRequest("the line's arguments are malformed JSON") from None
            except _OutOfRange:
                if text[pos] not in "-0123456789":
                    raise  # inside a JSON value
                # A long number on its own is a word (an identifier, say).
        if end < 0 or (end < size and text[end] not in _SPACE_CHARS):
            # Not JSON, or JSON followed by more word (``123abc``): a bare word.
            end = _word_end(text, pos)
            value = text[pos:end]
        values.append(value)
        pos = _skip_spaces(text, end)
    return values


def _skip_spaces(text: str, pos: int) -> int:
    """The index of the first character at or after ``pos`` that is not a space or tab."""
    window = _FIRST_WINDOW
    while True:
        piece = text[pos : pos + window]
        rest = piece.lstrip()  # all whitespace: several times faster than lstrip(" \t")
        skipped = len(piece) - len(rest)
        if piece.count(" ", 0, skipped) + piece.count("\t", 0, skipped) != skipped:
            rest = piece.lstrip(_SPACE_CHARS)  # other whitespace (\f, U+3000) is a word
        if rest or len(piece) < window:
            return pos + len(piece) - len(rest)
        pos += window
        window *= 2


def _word_end(text: str, pos: int) -> int:
    """The index of the first space or tab at or after ``pos``, or the end."""
    size = len(text)
    window = _FIRST_WINDOW
    while pos < size:
        stop = pos + window
        space, tab = text.find(" ", pos, stop), text.find("\t", pos, stop)
        if space >= 0 or tab >= 0:
            return min(space, tab) if space >= 0 and tab >= 0 else max(space, tab)
        pos = stop
        window *= 2
    return size


def format_result(method: str, result: Any) -> bytes:
    """The answer line(s) for a successful request."""
    if method == "metrics" and isinstance(result, str):
        return result.encode() if result.endswith("\n") else (result + "\n").encode()
    return _dumps(result)


def format_error(error: RemoteError) -> bytes:
    return _dumps({"error": {"code": error.code, "message": error.message}})


def format_notification(method: str, params: list[Any]) -> bytes:
    """A notification the daemon pushes, as one JSON line."""
    return _dumps({"notification": method, "params": params})


def _dumps(value: Any) -> bytes:
    """One line of compact JSON, UTF-8.

    A string UTF-8 cannot hold (a lone surrogate, as the seed's
    ``JSON.stringify`` may have stored) makes the whole line ASCII with
    ``\\uXXXX`` escapes, which is how JavaScript writes it too.
    """
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode() + b"\n"
