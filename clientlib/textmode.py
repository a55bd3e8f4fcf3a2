"""The text protocol for socat one-liners, sans-IO (DESIGN section 2.2).

A connection whose first byte is an ASCII letter speaks lines: ``METHOD [ARG
...]``, where each argument is a JSON value if one parses there (objects may
contain spaces) and a bare word otherwise. Every request line gets exactly one
line back: compact JSON, or ``{"error": {...}}``. ``metrics`` is the one
exception: it answers with the Prometheus text exposition, several lines.

Blank lines are skipped without an answer, so a trailing newline or an empty
line in a here-document never produces a stray error.
"""

from __future__ import annotations

import json
from typing import Any, Final

from .errors import BadRequest, ProtocolError, RemoteError

__all__ = [
    "LineBuffer",
    "format_error",
    "format_result",
    "is_text_start",
    "parse_line",
]

_LETTERS: Final = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_WHITESPACE: Final = " \t"


def is_text_start(first_byte: int) -> bool:
    """True when a connection's first byte opens a text session."""
    return first_byte in _LETTERS


class LineBuffer:
    """Splits a byte stream into lines, with a bound on a line's length."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buffer = bytearray()
        self._scanned = 0  # bytes of _buffer known to hold no newline

    def receive_data(self, data: bytes) -> None:
        self._buffer += data

    def next_line(self) -> bytes | None:
        """The next complete line without its ending, or None.

        Raises ``ProtocolError`` once an unfinished line is over the limit.
        """
        end = self._buffer.find(b"\n", self._scanned)
        if end < 0:
            self._scanned = len(self._buffer)
            if self._scanned > self.max_line_bytes:
                raise ProtocolError(f"line longer than {self.max_line_bytes} bytes")
            return None
        if end > self.max_line_bytes:
            raise ProtocolError(f"line longer than {self.max_line_bytes} bytes")
        line = bytes(self._buffer[:end])
        del self._buffer[: end + 1]
        self._scanned = 0
        return line.removesuffix(b"\r")

    def rest(self) -> bytes | None:
        """At end of input: an unterminated last line, if any."""
        if not self._buffer:
            return None
        line = bytes(self._buffer).removesuffix(b"\r")
        self._buffer.clear()
        self._scanned = 0
        return line


def _no_constants(name: str) -> Any:
    # NaN and Infinity are not JSON; as bare words they stay strings.
    raise ValueError(name)


_DECODER: Final = json.JSONDecoder(parse_constant=_no_constants)


def parse_line(line: bytes) -> tuple[str, list[Any]] | None:
    """``(method, params)`` of a request line; None for a blank line.

    The method name is lower-cased (names are case-insensitive). Raises
    ``BadRequest`` for a line that is not UTF-8.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("a text request must be UTF-8") from None
    tokens = _tokens(text)
    if not tokens:
        return None
    method = tokens[0]
    if not isinstance(method, str):
        raise BadRequest("a line starts with a method name")
    return method.lower(), tokens[1:]


def _tokens(text: str) -> list[Any]:
    values: list[Any] = []
    pos, size = 0, len(text)
    while True:
        while pos < size and text[pos] in _WHITESPACE:
            pos += 1
        if pos >= size:
            return values
        try:
            value, end = _DECODER.raw_decode(text, pos)
        except ValueError:
            end = -1
        if end < 0 or (end < size and text[end] not in _WHITESPACE):
            # Not JSON, or JSON followed by more word (``123abc``): a bare word.
            end = pos
            while end < size and text[end] not in _WHITESPACE:
                end += 1
            value = text[pos:end]
        values.append(value)
        pos = end


def format_result(method: str, result: Any) -> bytes:
    """The answer line(s) for a successful request."""
    if method == "metrics" and isinstance(result, str):
        return result.encode() if result.endswith("\n") else (result + "\n").encode()
    return _dumps(result)


def format_error(error: RemoteError) -> bytes:
    return _dumps({"error": {"code": error.code, "message": error.message}})


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
